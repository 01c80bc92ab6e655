"""A FirstRankPerNode whose node-1 first rank fails (run under torchrun by the tests).

Usage: guard_worker.py kill|raise. Each rank that sees the failure writes one line
``GUARD rank=R <error type> rank=F node=N type=T`` and exits non-zero.
"""

import os
import signal
import sys

import torch.distributed as dist

import accel_utils
from accel_utils import FirstRankFailedError, FirstRankPerNode

mode = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    with FirstRankPerNode() as first:
        if rank == 2:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("preprocessing failed on node 1")
except FirstRankFailedError as exc:
    sys.stdout.write(
        f"GUARD rank={rank} {type(exc).__name__} rank={exc.rank} node={exc.node} "
        f"type={exc.exc_type}\n"
    )
    sys.stdout.flush()
    sys.exit(1)
accel_utils.destroy_process_group()
