"""A worker for the namespace test bed (tests/test_multihost.py): 2 nodes x 2 ranks on gloo.

Usage: partition_worker.py guard|guard_timeout|barrier|healthy|hangwatch

Lines it prints (the test reads them):
* ``READY rank=R`` once the process group is up (and, for ``barrier``, after a warm-up barrier);
* ``WORKING rank=R`` when node 1's first rank starts its block (``guard``: 15 s), or when a
  rank's training loop has made 5 steps (``hangwatch``, whose ranks then exit with the code
  that HangWatch ends them with);
* ``RESULT {json}`` with what happened: the error's type, ``ranks`` and ``nodes``, or ``passed``;
* ``PASSED rank=R`` if a rank got past the guard or barrier.
A rank that raised exits 1.
"""

import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch.distributed as dist

import accel_utils
from accel_utils import FirstRankPerNode, barrier_and_log


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def result(**fields: object) -> None:
    say("RESULT " + json.dumps(fields, default=str))


def failed(rank: int, exc: BaseException) -> None:
    result(rank=rank, error=type(exc).__name__, ranks=getattr(exc, "ranks", None),
           nodes=getattr(exc, "nodes", None), message=str(exc)[:500])
    if rank == 0:  # it hosts the job's store here (no torchrun agent): let the others read it
        time.sleep(5)
    sys.exit(1)


def _guard(rank: int, work_s: float, **limits: object) -> None:
    """Every rank enters one guard; node 1's first rank (2) works ``work_s`` in its block."""
    say(f"READY rank={rank}")
    try:
        with FirstRankPerNode(local=True, **limits) as first:  # type: ignore[arg-type]
            if rank == 2:
                say(f"WORKING rank={rank}")
                time.sleep(work_s)
        say(f"PASSED rank={rank} first={first}")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        failed(rank, exc)
    result(rank=rank, passed=True)


def guard(rank: int) -> None:
    _guard(rank, 15, liveness=3, timeout=timedelta(seconds=600))


def guard_timeout(rank: int) -> None:
    """Every rank waits in a guard with a 12 s timeout and liveness (node 1's first rank works
    25 s): the bound holds whatever the two are (the issue saw 30 s each)."""
    _guard(rank, 25, timeout=timedelta(seconds=12), liveness=12)


def barrier(rank: int) -> None:
    barrier_and_log("warm-up", liveness=3)  # the side channel is up on every rank
    say(f"READY rank={rank}")
    try:
        if rank == 1:  # arrives after node 1 was cut off (1.5 s after READY)
            time.sleep(2.5)
        barrier_and_log("x", liveness=3)
        say(f"PASSED rank={rank}")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        failed(rank, exc)
    result(rank=rank, passed=True)


def healthy(rank: int) -> None:
    local_dir, shared_dir = os.environ["BED_LOCAL_DIR"], os.environ["BED_SHARED_DIR"]
    nodes = accel_utils.resolve().nodes
    out = {"rank": rank, "host": socket.gethostname(), "num_nodes": nodes.num_nodes,
           "node_rank": nodes.node_rank, "local_rank": nodes.local_rank,
           "local_world_size": nodes.local_world_size}
    runs = {}
    for name, kwargs, where in (("local", {"local": True}, local_dir),
                                ("auto_shared", {"local": "auto", "path": shared_dir}, shared_dir),
                                ("auto_local", {"local": "auto", "path": local_dir}, local_dir)):
        with FirstRankPerNode(**kwargs) as first:
            if first:  # the "preprocessing": one marker per run of the block
                with open(os.path.join(where, f"{name}-rank{rank}"), "w") as fh:
                    fh.write("done")
        runs[name] = {"first": first,
                      "markers": sorted(f for f in os.listdir(where) if f.startswith(name))}
    out["runs"] = runs
    result(**out)
    accel_utils.destroy_process_group()


def hangwatch(rank: int) -> None:
    """A training loop of all-reduces under HangWatch(on_stall="exit"), until the test cuts a
    node off; the watch then ends every process (exit code 1) after its report."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    say(f"READY rank={rank}")
    with accel_utils.HangWatch(stall=3, liveness=4, on_stall="exit") as watch:
        for step in range(1, 100_000):
            watch.step()
            dist.all_reduce(torch.ones(1))  # the step's all-reduce
            time.sleep(0.1)
            if step == 5:
                say(f"WORKING rank={rank}")
    say(f"PASSED rank={rank}")


def main() -> None:
    mode = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    {"guard": guard, "guard_timeout": guard_timeout, "barrier": barrier, "healthy": healthy,
     "hangwatch": hangwatch}[mode](rank)
    if mode != "healthy":
        accel_utils.destroy_process_group()


if __name__ == "__main__":
    main()
