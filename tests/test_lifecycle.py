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
