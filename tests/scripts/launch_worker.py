"""A worker for tests/test_launching.py: node identity and one first rank per node, on the bed.

Usage: launch_worker.py TAG [--accelerator] [--late-import]

``--accelerator`` builds ``Accelerator(cpu=True)`` (which joins the process group and, under a
launch without torchrun, writes LOCAL_RANK=0 / LOCAL_WORLD_SIZE=1 into os.environ) before
anything asks accel-utils for the topology; without it the script joins with
``init_process_group("gloo")``. ``--late-import`` imports accel_utils only after that (a script
that builds its Accelerator first: the variables Accelerate wrote are what accel-utils reads).
Then it resolves its node identity and runs one
``FirstRankPerNode(local=True)`` block; a rank that runs it first writes its rank into the
node-local directory ``$BED_LOCAL_DIR/TAG`` (a tmpfs per node).

It prints one ``RESULT {json}`` line: the resolved identity, whether it went first, the markers
its node's disk holds after the guard, what os.environ says now, and the messages accel-utils'
topology logger emitted (debug and up).
"""

import json
import logging
import os
import socket
import sys
import time
from datetime import timedelta

if "--late-import" not in sys.argv:
    import accel_utils  # noqa: F401 - first: the launcher's variables are read here


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.getMessage()}")


def main() -> None:
    tag = sys.argv[1]
    keep = _Keep()
    topo_logger = logging.getLogger("accel_utils.topology")
    topo_logger.addHandler(keep)
    topo_logger.setLevel(logging.DEBUG)
    if "--accelerator" in sys.argv[2:]:
        from accelerate import Accelerator

        handle = Accelerator(cpu=True)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        handle = None
    import accel_utils  # with --late-import: only now, after Accelerate wrote its variables
    topo = accel_utils.resolve(handle)
    start = time.perf_counter()
    nodes = topo.nodes
    nodes_ms = (time.perf_counter() - start) * 1e3  # recorded for reports, never asserted
    where = os.path.join(os.environ["BED_LOCAL_DIR"], tag)
    os.makedirs(where, exist_ok=True)
    with accel_utils.FirstRankPerNode(handle, local=True, timeout=timedelta(seconds=60)) as first:
        if first:
            with open(os.path.join(where, f"rank{topo.rank}"), "w") as fh:
                fh.write("first")
    out = {
        "rank": topo.rank,
        "world_size": topo.world_size,
        "host": socket.gethostname(),
        "node_rank": nodes.node_rank,
        "num_nodes": nodes.num_nodes,
        "local_rank": nodes.local_rank,
        "local_world_size": nodes.local_world_size,
        "first": first,
        "markers": sorted(os.listdir(where)),
        "environ": {k: os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")},
        "log": keep.messages,
        "nodes_ms": nodes_ms,
    }
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
    accel_utils.destroy_process_group()


if __name__ == "__main__":
    main()
