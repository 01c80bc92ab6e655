"""Benchmark 2: a first-rank guard around an empty block.

Floor: one small all-reduce and one barrier on a gloo group, what a guard that reports failures
needs at the least (the bare all-reduce is shown as well). Peers: Accelerate's
``local_main_process_first()`` (a barrier on each side, no failure reporting) and the seed's
shape, which builds and destroys a gloo group for every barrier.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from bench_timing import Variant

INNER = 20  # calls per timed block: short blocks, many rotations, noise hits all alike


def seed_barrier(timeout: timedelta) -> None:
    """The seed's shape of one barrier: new gloo group, monitored barrier, destroy the group."""
    group = dist.new_group(backend="gloo")
    try:
        dist.monitored_barrier(group=group, timeout=timeout)
    finally:
        dist.destroy_process_group(group)


class SeedGuard:
    """The seed's guard: waiting ranks barrier on entry, the first rank on exit."""

    def __init__(self, local_rank: int, timeout: timedelta = timedelta(minutes=5)) -> None:
        self.first = local_rank == 0
        self.timeout = timeout

    def __enter__(self) -> bool:
        if not self.first:
            seed_barrier(self.timeout)
        return self.first

    def __exit__(self, *exc: Any) -> bool:
        if self.first:
            seed_barrier(self.timeout)
        return False


def variants(accelerator: Any, gloo: dist.ProcessGroup, local_rank: int) -> list[Variant]:
    """The floor, accel-utils' FirstRankPerNode and its peers, each around an empty block."""
    flag = torch.zeros(1)

    def floor() -> None:
        dist.all_reduce(flag, group=gloo)
        dist.barrier(group=gloo)

    def accelerate_guard() -> None:
        with accelerator.local_main_process_first():
            pass

    def seed_guard() -> None:
        with SeedGuard(local_rank):
            pass

    out = [
        Variant("floor", "floor: all_reduce(1 element) + barrier (gloo)", floor, INNER),
        Variant("allreduce", "all_reduce(1 element) alone (gloo)",
                lambda: dist.all_reduce(flag, group=gloo), INNER),
        Variant("accelerate", "Accelerate local_main_process_first()", accelerate_guard, INNER),
        Variant("seed", "seed shape: new gloo group per barrier", seed_guard, 3),
    ]
    try:
        from accel_utils import FirstRankPerNode
        from accel_utils.barriers import _barrier_with_timeout
    except (ImportError, AttributeError):
        return out

    def guard() -> None:
        with FirstRankPerNode():
            pass

    out.insert(1, Variant("accel_utils", "accel_utils.FirstRankPerNode()", guard, INNER))
    out.insert(2, Variant("barrier", "accel_utils _barrier_with_timeout (cached side group)",
                          lambda: _barrier_with_timeout(timedelta(minutes=5)), INNER))
    return out
