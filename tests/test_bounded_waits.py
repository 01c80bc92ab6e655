"""Every wait bounded, every diagnosis exact: members that never arrive, creation errors, the
store's host, exact call matching (issue 25). Real gloo groups, hard timeouts."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from accel_utils import BarrierTimeoutError, FirstRankFailedError, FirstRankPerNode
from accel_utils.errors import SideChannelError
from tests.harness import run_distributed

_ERRORS = (BarrierTimeoutError, FirstRankFailedError, SideChannelError)


def _outcome(exc: BaseException, start: float) -> dict:
    return {"error": type(exc).__name__, "message": str(exc), "after": time.monotonic() - start,
            "ranks": list(getattr(exc, "ranks", []))}


def _first_guard_without(victim: int, fault: str, liveness: float) -> dict:
    """Rank ``victim`` (node 1's first rank) never reaches its first guard: ``fault``."""
    if dist.get_rank() == victim:
        time.sleep(1.0)  # the others are inside the guard (creating its side group) by now
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "exit":  # a script whose exception ended its process before the guard
            os._exit(1)
        time.sleep(8.0)  # "late": alive, still loading data, then it comes
    start = time.monotonic()
    try:
        with FirstRankPerNode(timeout=timedelta(hours=1), liveness=liveness):
            pass
    except _ERRORS as exc:
        return _outcome(exc, start)
    return {"passed": time.monotonic() - start}


def test_a_rank_killed_before_its_first_guard_is_named_dead_within_seconds() -> None:
    # the others sat in side-group creation until the guard's timeout (10 hours by default)
    out = run_distributed(_first_guard_without, 4, 2, "kill", 30.0, nodes=2, timeout=60,
                          expect_ok=False)
    for rank in (0, 1, 3):
        assert out[rank]["error"] == "SideChannelError", out[rank]
        assert out[rank]["ranks"] == [2] and "rank 2" in out[rank]["message"], out[rank]
        assert "died" in out[rank]["message"] and "process is gone" in out[rank]["message"]
        assert out[rank]["after"] < 10, out[rank]


def test_a_rank_whose_script_exited_before_its_first_guard_is_named_dead() -> None:
    out = run_distributed(_first_guard_without, 4, 2, "exit", 30.0, nodes=2, timeout=60,
                          expect_ok=False)
    for rank in (0, 1, 3):
        assert out[rank]["error"] == "SideChannelError" and out[rank]["ranks"] == [2], out[rank]


def test_a_late_rank_that_lives_is_waited_for_not_named() -> None:
    # alive, 9 s late with a 2 s liveness window: its sign of life keeps it from being named
    out = run_distributed(_first_guard_without, 4, 2, "late", 2.0, nodes=2, timeout=60)
    assert all("passed" in o for o in out), out


def _store_host_dies_while_rank_two_works() -> dict:
    """Rank 0 hosts the job's TCPStore here (env:// rendezvous); it dies after its block."""
    rank, start = dist.get_rank(), time.monotonic()
    try:
        with FirstRankPerNode(timeout=timedelta(seconds=60), liveness=5.0):
            if rank == 0:  # dies 1 s after its block, waiting in the guard for rank 2
                threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGKILL)).start()
            if rank == 2:
                time.sleep(6.0)  # still working when the store goes
    except _ERRORS as exc:
        return _outcome(exc, start)
    return {"passed": time.monotonic() - start}


def test_when_the_store_host_dies_live_ranks_are_not_named_dead() -> None:
    # named "rank 0, rank 2 died" after 13 s, though rank 2 was alive and working
    out = run_distributed(_store_host_dies_while_rank_two_works, 4, nodes=2, timeout=60,
                          expect_ok=False)
    for rank in (1, 2, 3):
        o = out[rank]
        assert o.get("error") == "SideChannelError", o
        assert "lost the job's store" in o["message"] and "rank 0's process" in o["message"], o
        assert o["ranks"] == [] and "died:" not in o["message"], o
        assert o["after"] < 30, out


def _gather_without_rank_one() -> dict:
    from accel_utils import gather_sharded_results

    start = time.monotonic()
    if dist.get_rank() == 1:  # scores nothing and never gathers (a branch the others took)
        time.sleep(4.0)
        return {}
    try:
        gather_sharded_results([0], (0, 2), timeout=1.5)
    except _ERRORS as exc:
        return {**_outcome(exc, start), "missing": getattr(exc, "missing_ranks", None)}
    return {"passed": True}


def test_the_eval_gather_is_bounded_and_names_the_rank_that_did_not_come() -> None:
    # the results gather waited with whatever timeout the group had (30 minutes, or a guard's
    # 10 hours on the side group), outside the side channel's diagnosis
    out = run_distributed(_gather_without_rank_one, 2, timeout=60)
    assert out[0]["error"] == "BarrierTimeoutError" and out[0]["missing"] == [1], out[0]
    assert out[0]["after"] < 10, out[0]


def _failed_guards(count: int) -> dict:
    from accel_utils import _side

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    seen = {}
    for i in range(count):
        try:
            with FirstRankPerNode(local=False, timeout=30):
                if dist.get_rank() == 0:
                    raise ValueError(f"bad shard {i}")
        except (ValueError, FirstRankFailedError):
            pass  # every failure parks this rank's side group; the next guard builds a new one
        if i in (10, count - 1):
            time.sleep(5.0)  # two sweeps of the keeper
            seen[i] = (descriptors(), _side.held_count())
    return {"seen": seen, "parked": _side.parked_count()}


def test_descriptors_of_failed_operations_come_back() -> None:
    # parked groups were never freed: each failed guard kept its sockets until exit
    out = run_distributed(_failed_guards, 2, 60, timeout=200)
    for o in out:
        (early_fds, _), (late_fds, late_held) = o["seen"][10], o["seen"][59]
        assert o["parked"] >= 60, o
        assert late_held <= 2 and late_fds - early_fds < 20, o
