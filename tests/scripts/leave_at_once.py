"""Node 1's first rank raises while node 0's first rank works on (run by the tests).

Ranks 1-3 must raise and their processes exit while rank 0 is still inside its block.
Launched without torchrun (plain processes with the launcher variables), so that nobody
kills the survivors for us.
"""

import sys
import time
from datetime import timedelta

import torch.distributed as dist

from accel_utils import FirstRankFailedError, FirstRankPerNode

dist.init_process_group("gloo", timeout=timedelta(seconds=120))
rank = dist.get_rank()
try:
    with FirstRankPerNode(timeout=timedelta(seconds=120)) as first:
        if rank == 2:
            raise ValueError("preprocessing failed on node 1")
        if first:
            time.sleep(float(sys.argv[1]))
except (FirstRankFailedError, ValueError) as exc:
    print(f"RAISED rank={rank} {type(exc).__name__}", flush=True)
    sys.exit(1)  # no teardown: the process must be able to leave while rank 0 works
