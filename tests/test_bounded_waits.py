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


def _guards_from_short_lived_threads(count: int) -> dict:
    seen = []

    def guard() -> None:
        with FirstRankPerNode(timeout=30):
            pass

    for i in range(count):
        thread = threading.Thread(target=guard, name="loader")  # one name, as on every rank
        thread.start()
        thread.join(60)
        if i in (5, count - 1):
            seen.append((threading.active_count(), len(os.listdir("/proc/self/fd"))))
    return {"seen": seen}


def test_guards_from_short_lived_threads_of_one_name_hold_no_more_over_time() -> None:
    # a thread's lane (heartbeat thread, store connection, gloo group) is found again by name
    out = run_distributed(_guards_from_short_lived_threads, 2, 200, timeout=120)
    for o in out:
        (threads_early, fds_early), (threads_late, fds_late) = o["seen"]
        assert threads_late <= threads_early and fds_late - fds_early < 5, o


def _failed_guards(count: int) -> dict:
    """``count`` guards whose first rank (0) raises: every one fails on both ranks."""
    from accel_utils._side.gloo import held_count

    seen, errors = [], set()
    for i in range(count):
        try:
            with FirstRankPerNode(timeout=30, liveness=10):
                if dist.get_rank() == 0:
                    raise ValueError("no tokenizer")
        except (ValueError, FirstRankFailedError) as exc:
            errors.add(type(exc).__name__)
        if i in (5, count - 1):
            time.sleep(2.5)  # the keeper frees a completed group within a second or two
            seen.append((len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd")),
                         held_count()))  # OS threads: gloo's own are not Python threads
    return {"seen": seen, "errors": sorted(errors)}


def test_failed_operations_free_their_groups() -> None:
    # Each failure abandons the side group (a fresh one is built for the next call). A group
    # whose last operation completed (every member contributed) is freed, not kept forever:
    # on main each failure kept 3 threads and 6-8 descriptors per rank.
    out = run_distributed(_failed_guards, 2, 100, timeout=180)
    assert out[0]["errors"] == ["ValueError"] and out[1]["errors"] == ["FirstRankFailedError"]
    for o in out:
        (threads_early, fds_early, _), (threads_late, fds_late, held) = o["seen"]
        assert held == 0, o
        assert threads_late <= threads_early and fds_late <= fds_early, o
