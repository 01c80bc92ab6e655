"""Barriers on the cached gloo side channel, on real gloo process groups."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from accel_utils import FirstRankPerNode, _side, barrier_and_log
from accel_utils.barriers import _barrier_with_timeout, _create_gloo_group
from tests.harness import run_distributed


class _Keep(logging.Handler):
    """Keeps the messages of one logger (workers run in other processes: no caplog there)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[str, str]] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelname, record.getMessage()))

    def __enter__(self) -> _Keep:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(logging.NOTSET)


def test_without_a_process_group_nothing_waits() -> None:
    assert not dist.is_initialized()
    assert _create_gloo_group() is None
    assert _barrier_with_timeout(timedelta(seconds=1)) is True
    with _Keep("accel_utils.barriers") as keep:
        barrier_and_log("alone")
    assert len(keep.messages) == 1 and "alone" in keep.messages[0][1]
    assert "last to arrive: rank 0" in keep.messages[0][1]


@pytest.mark.parametrize("bad", [timedelta(0), timedelta(seconds=-1), 0, -2.5])
def test_non_positive_timeout_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="positive"):
        _barrier_with_timeout(bad)
    with pytest.raises(ValueError, match="positive"):
        FirstRankPerNode(timeout=bad)


@pytest.mark.parametrize("bad", ["10s", None, True])
def test_timeout_of_wrong_type_is_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="timedelta"):
        _barrier_with_timeout(bad)


def _count_side_groups() -> dict:
    created = []
    real = dist.ProcessGroupGloo

    def counting(*args, **kwargs):  # counts constructions; the real group is built
        created.append(1)
        return real(*args, **kwargs)

    for name in ("_Options", "create_device", "create_default_device"):  # used to build one
        setattr(counting, name, getattr(real, name))

    dist.ProcessGroupGloo = counting
    try:
        pair = dist.new_group([0, 1])
        side = _create_gloo_group()
        for _ in range(5):
            assert _barrier_with_timeout(timedelta(seconds=30))
        for _ in range(3):
            with FirstRankPerNode():
                pass
        barrier_and_log("counted")
        same = _create_gloo_group(None) is side and _create_gloo_group(dist.group.WORLD) is side
        if dist.get_rank() in (0, 1):  # only the members of the pair take part
            for _ in range(3):
                assert _barrier_with_timeout(timedelta(seconds=30), pair)
                with FirstRankPerNode(pair):
                    pass
            same = same and _create_gloo_group(pair) is not side
    finally:
        dist.ProcessGroupGloo = real
    return {"created": len(created), "same": same}


def test_side_group_created_once_per_parent_group() -> None:
    out = run_distributed(_count_side_groups, 4)
    assert [o["created"] for o in out] == [2, 2, 1, 1]
    assert all(o["same"] for o in out)


def _late_rank(late: int, nap: float) -> dict:
    assert _barrier_with_timeout(timedelta(seconds=30))  # the side group exists before the nap
    with _Keep("accel_utils.barriers") as keep:
        if dist.get_rank() == late:
            time.sleep(nap)
        ok = _barrier_with_timeout(timedelta(seconds=1))
        # afterwards the side channel is rebuilt and works again for everybody
        again = _barrier_with_timeout(timedelta(seconds=30))
    warnings = [m for lvl, m in keep.messages if lvl == "WARNING"]
    return {"ok": ok, "again": again, "warnings": warnings}


def test_barrier_timeout_returns_false_and_names_the_missing_rank() -> None:
    out = run_distributed(_late_rank, 4, 2, 3.0, timeout=30)
    for rank in (0, 1, 3):
        assert out[rank]["ok"] is False
        assert any("waiting for rank(s) [2]" in w for w in out[rank]["warnings"])
    assert out[2]["ok"] is False  # the late rank learns that the others gave up
    assert all(o["again"] for o in out)


def _gloo_timeout_is_reset() -> str:
    # the accessor that makes a cached group honour a new timeout (private before torch 2.13)
    side = _create_gloo_group()
    _side.set_timeout(side, timedelta(milliseconds=700))
    if dist.get_rank() == 0:
        try:
            side.allreduce([torch.zeros(1)]).wait()
        except RuntimeError as exc:
            return str(exc)
        return "completed"
    time.sleep(2)
    return "slept"


def test_cached_side_group_honours_a_new_timeout() -> None:
    out = run_distributed(_gloo_timeout_is_reset, 2)
    assert "700ms" in out[0]


def _log_after_barrier(handle_kind: str) -> list:
    handle = None
    if handle_kind == "accelerator":
        from accelerate import Accelerator

        handle = Accelerator(cpu=True)
    dist.barrier()  # start together, whatever building the handle took on each rank
    with _Keep("accel_utils.barriers") as keep:
        if dist.get_rank() == 2:
            time.sleep(0.5)
        barrier_and_log("epoch done", handle)
        barrier_and_log("again", handle)
    return [m for lvl, m in keep.messages if lvl == "INFO"]


@pytest.mark.parametrize("handle_kind", ["none", "accelerator"])
def test_barrier_and_log_logs_once_on_rank_zero_with_the_last_rank(handle_kind: str) -> None:
    out = run_distributed(_log_after_barrier, 4, handle_kind)
    assert out[1] == out[2] == out[3] == []
    assert len(out[0]) == 2
    assert "epoch done" in out[0][0] and "last to arrive: rank 2" in out[0][0]
    assert "again" in out[0][1] and "barrier took" in out[0][1]


def _creation_fails() -> dict:
    with _Keep("accel_utils.barriers") as keep:
        if dist.get_rank() == 1:
            time.sleep(2.5)  # rank 0 gives up waiting for it to create the side group
        side = _create_gloo_group(timeout=timedelta(seconds=1))
    return {"none": side is None, "warnings": [m for lvl, m in keep.messages if lvl == "WARNING"]}


def test_a_side_group_that_cannot_be_created_is_none_with_a_warning() -> None:
    out = run_distributed(_creation_fails, 2)
    assert out[0]["none"] is True
    assert any("could not create a gloo side group" in w for w in out[0]["warnings"])
