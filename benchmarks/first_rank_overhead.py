"""What a FirstRankPerNode around an empty block costs, next to one small all-reduce.

    torchrun --nproc_per_node 2 benchmarks/first_rank_overhead.py [--iters 300]

Variants, each timed per call (median over ``--iters`` after a warm-up), on rank 0:

* ``all_reduce``: one 1-element all-reduce on a gloo group, the floor;
* ``barrier``: ``_barrier_with_timeout`` on the cached side group;
* ``guard``: ``FirstRankPerNode()`` around an empty block;
* ``seed_barrier``: the seed's shape, a new gloo group + monitored barrier + destroy per barrier
  (its guard costs one of these per rank).

Prints one ``RESULT`` JSON line with the medians in microseconds and the ratios to
``all_reduce``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

import accel_utils
from accel_utils import FirstRankPerNode
from accel_utils.barriers import _barrier_with_timeout


def median_us(fn: Callable[[], None], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier()  # every rank starts the call together
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def seed_barrier() -> None:
    group = dist.new_group(backend="gloo")
    dist.monitored_barrier(group=group, timeout=timedelta(minutes=5))
    dist.destroy_process_group(group)


def empty_guard() -> None:
    with FirstRankPerNode():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    flag = torch.zeros(1)
    variants = {
        "all_reduce": lambda: dist.all_reduce(flag),
        "barrier": lambda: _barrier_with_timeout(timedelta(minutes=5)),
        "guard": empty_guard,
        "seed_barrier": seed_barrier,
    }
    result = {}
    for name, fn in variants.items():
        iters = max(20, args.iters // 10) if name == "seed_barrier" else args.iters
        result[name] = median_us(fn, iters, warmup=10)
    if dist.get_rank() == 0:
        floor = result["all_reduce"]
        report = {
            "world_size": dist.get_world_size(),
            "median_us": {k: round(v, 1) for k, v in result.items()},
            "ratio_to_all_reduce": {k: round(v / floor, 2) for k, v in result.items()},
        }
        sys.stdout.write(f"RESULT {json.dumps(report)}\n")
        sys.stdout.flush()
    accel_utils.destroy_process_group()  # barrier, then destroy_process_group()


if __name__ == "__main__":
    main()
