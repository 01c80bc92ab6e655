"""destroy_process_group: barrier, then teardown; a no-op without a group."""

from __future__ import annotations

import torch.distributed as dist

from accel_utils import destroy_process_group
from tests.harness import run_distributed


def _destroy() -> bool:
    destroy_process_group()
    return dist.is_initialized()


def test_destroys_the_group_on_every_rank() -> None:
    assert run_distributed(_destroy, 2) == [False, False]


def test_without_a_group_does_nothing() -> None:
    destroy_process_group()
    assert not dist.is_initialized()


def _releases_cached_groups() -> tuple[int, int, int]:
    import weakref

    from accel_utils import _side, barriers, resolve

    barriers._barrier_with_timeout(30)  # builds and caches the side group
    world = weakref.ref(resolve().group)
    side = weakref.ref(barriers._create_gloo_group())
    cached = _side.lane_count()
    destroy_process_group()
    import gc

    gc.collect()
    return cached, int(world() is None), int(side() is None)


def test_releases_every_cached_group() -> None:
    # a group that survives into interpreter exit can abort it (gloo frees work without the GIL)
    assert run_distributed(_releases_cached_groups, 2) == [(1, 1, 1), (1, 1, 1)]
