"""Failure semantics on real gloo groups: every fault gives every survivor the true diagnosis.

2 simulated nodes x 2 ranks (ranks 0, 1 on node 0; 2, 3 on node 1; first ranks 0 and 2). A
fault hits node 1's first rank (rank 2) or its waiting rank (rank 3); every surviving rank must
raise the error that names the right rank, node and cause, and nobody may pass the guard
before every first rank finished. Frozen processes are resumed (or killed) by the test itself,
so that no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch.distributed as dist

from accel_utils import BarrierTimeoutError, FirstRankFailedError, FirstRankPerNode, barrier_and_log
from accel_utils.barriers import _barrier_with_timeout
from accel_utils.errors import RanksNotRespondingError, SideChannelError
from tests.harness import REPO_ROOT, RankFailure, free_port, launch_env, run_distributed


def _outcome(exc: BaseException) -> dict:
    keep = ("rank", "node", "exc_type", "missing_ranks", "unresponsive_ranks", "ranks", "nodes",
            "calls")
    return {"error": type(exc).__name__, "message": str(exc), "at": time.time(),
            **{k: getattr(exc, k) for k in keep if hasattr(exc, k)}}


def _late_mark(rank: int, delay: float) -> None:
    """After ``delay``, bump ``rank``'s heartbeat mark: its last one, delivered late.

    A TCPStore set is not acknowledged: a set sent just before a process dies may reach the
    store after the survivors began to watch every mark.
    """
    from accel_utils._side import lane_for
    from accel_utils._side.wire import Mark, mark_key

    base = lane_for(dist.group.WORLD).link

    def write() -> None:
        time.sleep(delay)
        mark = Mark.parse(base.get(mark_key(rank)))
        base.set(mark_key(rank), str(Mark(mark.seq, mark.phase, mark.count + 1)))

    threading.Thread(target=write, name="late-mark", daemon=True).start()


def _guard_fault(first_fault: str, waiting_fault: str, timeout_s: float,
                 liveness_s: float | None) -> dict:
    """Node 1's first rank (2) suffers ``first_fault``; its waiting rank (3) ``waiting_fault``."""
    pids: list = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    rank, out = dist.get_rank(), {}
    guard = FirstRankPerNode(timeout=timedelta(seconds=timeout_s), liveness=liveness_s)
    try:
        with guard as first:
            out["entered"] = time.time()
            if rank == 2:
                if first_fault == "raise":
                    raise ValueError("tokenizer exploded")
                if first_fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if first_fault == "stop":
                    time.sleep(0.5)
                    os.kill(os.getpid(), signal.SIGSTOP)  # the test resumes it at the end
                if first_fault == "slow":
                    time.sleep(timeout_s + 3)
            if rank == 0 and waiting_fault != "none":  # rank 3 is waiting by now
                time.sleep(1.5)
                os.kill(pids[3], signal.SIGKILL if waiting_fault.startswith("kill")
                        else signal.SIGSTOP)
                if waiting_fault == "kill-late":
                    _late_mark(3, delay=0.8)
            if first:
                out["first_done"] = time.time()
        out["passed"] = time.time()
    except (FirstRankFailedError, BarrierTimeoutError, SideChannelError) as exc:
        out.update(_outcome(exc))
    except ValueError as exc:  # its own exception: returned so that the task ends cleanly
        out.update(own=str(exc), at=time.time())
    finally:
        if rank != 3 or waiting_fault == "none":
            if "stop" in (first_fault, waiting_fault):
                time.sleep(3)  # every survivor has its diagnosis before the frozen rank resumes
            for pid in pids:  # resume what the test froze; the frozen rank then reports too
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):  # the rank the test killed
                        os.kill(pid, signal.SIGCONT)
    return out


def _run(first_fault: str, waiting_fault: str = "none", timeout_s: float = 60,
         liveness_s: float | None = 2.0) -> list:
    return run_distributed(_guard_fault, 4, first_fault, waiting_fault, timeout_s, liveness_s,
                           nodes=2, timeout=40, expect_ok=False)


def test_a_first_rank_past_its_timeout_is_a_timeout_on_every_rank_not_a_death() -> None:
    out = _run("slow", timeout_s=2)
    for rank in (0, 1, 3):
        assert out[rank]["error"] == "BarrierTimeoutError", out[rank]
        assert out[rank]["missing_ranks"] == [2] and out[rank]["nodes"] == {2: 1}
    assert out[2]["error"] == "BarrierTimeoutError"  # the late rank hears why the others left
    assert out[2]["missing_ranks"] == [2]


def test_a_frozen_first_rank_with_a_short_timeout_is_named_as_not_responding() -> None:
    out = _run("stop", timeout_s=5, liveness_s=None)  # liveness off: the timeout decides
    for rank in (0, 1, 3):
        assert out[rank]["error"] == "BarrierTimeoutError", out[rank]
        assert out[rank]["missing_ranks"] == [2], out[rank]
        assert "died" not in out[rank]["message"] and "killed" not in out[rank]["message"]


def test_a_frozen_first_rank_is_named_after_liveness_while_the_timeout_is_hours() -> None:
    out = _run("stop", timeout_s=3600, liveness_s=2.0)
    for rank in (0, 1, 3):
        assert out[rank]["error"] == "RanksNotRespondingError", out[rank]
        assert out[rank]["ranks"] == [2] and out[rank]["nodes"] == {2: 1}
        assert "not responding (frozen or unreachable)" in out[rank]["message"]
        assert "passed" not in out[rank]
    assert out[2]["error"] == "RanksNotRespondingError"  # resumed, it learns why


def test_a_frozen_waiting_rank_is_named_by_the_first_ranks() -> None:
    out = _run("none", "stop", timeout_s=3600, liveness_s=2.0)
    for rank in (0, 1, 2):
        assert out[rank]["error"] == "RanksNotRespondingError", out[rank]
        assert out[rank]["ranks"] == [3] and out[rank]["nodes"] == {3: 1}


def test_a_frozen_waiting_rank_is_named_when_the_timeout_runs_out_first() -> None:
    out = _run("none", "stop", timeout_s=6, liveness_s=None)
    for rank in (0, 1, 2):
        assert out[rank]["error"] == "BarrierTimeoutError", out[rank]
        assert out[rank]["unresponsive_ranks"] == [3], out[rank]
        assert "stopped responding (frozen or unreachable)" in out[rank]["message"]


@pytest.mark.parametrize("fault", ["kill", "kill-late"])
def test_a_killed_waiting_rank_is_named_as_dead(fault: str) -> None:
    out = _run("none", fault)
    assert isinstance(out[3], RankFailure) and out[3].exc_type == "died"
    for rank in (0, 1, 2):
        assert out[rank]["error"] == "SideChannelError", out[rank]
        assert out[rank]["ranks"] == [3] and "rank 3 (node 1) died" in out[rank]["message"]


def test_a_raising_first_rank_leaves_at_once_while_the_other_first_rank_works() -> None:
    out = run_distributed(_raise_while_other_works, 4, nodes=2, timeout=40)
    # rank 2 raised its own error, and ranks 1 and 3 theirs, before rank 0 finished its block
    assert out[2]["own"] == "preprocessing failed" and out[2]["at"] < out[0]["first_done"]
    for rank in (1, 3):
        assert out[rank]["rank"] == 2 and out[rank]["at"] < out[0]["first_done"]
    assert out[0]["rank"] == 2 and "passed" not in out[0]


def _raise_while_other_works() -> dict:
    out: dict = {}
    try:
        with FirstRankPerNode(timeout=timedelta(seconds=60)) as first:
            if dist.get_rank() == 2:
                raise ValueError("preprocessing failed")
            if first:
                time.sleep(6)
                out["first_done"] = time.time()
        out["passed"] = time.time()
    except FirstRankFailedError as exc:
        out.update(_outcome(exc))
    except ValueError as exc:
        out.update(own=str(exc), at=time.time())
    return out


def _timed_out_first_use(world: int) -> dict:
    late = world - 1
    if dist.get_rank() == late:
        time.sleep(3)
    ok = _barrier_with_timeout(timedelta(seconds=1))  # the group's first side-channel call
    with FirstRankPerNode(local=False, timeout=timedelta(seconds=60)) as first:
        pass
    barrier_and_log("after the failed first use")
    again = _barrier_with_timeout(timedelta(seconds=30))
    return {"ok": ok, "first": first, "again": again}


@pytest.mark.parametrize("world", [2, 4])
def test_a_timed_out_first_use_leaves_every_rank_aligned(world: int) -> None:
    out = run_distributed(_timed_out_first_use, world, world, timeout=40)
    assert [o["ok"] for o in out] == [False] * world
    assert [o["first"] for o in out] == [True] + [False] * (world - 1)
    assert all(o["again"] for o in out)


def _first_call_times_out() -> dict:
    if dist.get_rank() == 1:
        time.sleep(3)
    try:
        barrier_and_log("first call", timeout=1)
    except BarrierTimeoutError as exc:
        return _outcome(exc)
    return {}


def test_barrier_and_log_as_a_first_call_names_the_late_rank() -> None:
    out = run_distributed(_first_call_times_out, 2, timeout=30)
    assert out[0]["error"] == "BarrierTimeoutError" and out[0]["missing_ranks"] == [1]
    assert out[1]["error"] == "BarrierTimeoutError"  # it hears why rank 0 left


def _mismatched(kind: str) -> dict:
    try:
        if kind == "strings":
            barrier_and_log(f"epoch {'A' if dist.get_rank() == 0 else 'B'}")
        else:
            if dist.get_rank() == 0:  # a barrier on rank 0 only, then a guard everywhere
                _barrier_with_timeout(timedelta(seconds=30))
            with FirstRankPerNode(timeout=timedelta(seconds=30)):
                pass
    except SideChannelError as exc:
        return _outcome(exc)
    return {}


def test_barrier_and_log_with_different_strings_raises_on_every_rank() -> None:
    out = run_distributed(_mismatched, 2, "strings", timeout=30)
    for o in out:
        assert o["error"] == "SideChannelError"
        assert "barrier_and_log 'epoch A'" in o["calls"][0]
        assert "barrier_and_log 'epoch B'" in o["calls"][1]


def _many_label_pairs(pairs: int) -> dict:
    paired = []
    for i in range(pairs):
        try:
            barrier_and_log(f"{'saved' if dist.get_rank() == 0 else 'loaded'} shard {i}")
            paired.append(i)
        except SideChannelError as exc:
            assert exc.calls, exc
    return {"paired": paired}


def test_barriers_with_different_strings_never_pair() -> None:
    # 5 CRC bits told labels apart: about 1 pair in 32 passed silently (P(none of 400) ~ 3e-6)
    out = run_distributed(_many_label_pairs, 2, 400, timeout=120)
    assert out[0]["paired"] == out[1]["paired"] == []


def test_a_barrier_on_one_rank_only_then_a_guard_raises_on_every_rank() -> None:
    out = run_distributed(_mismatched, 2, "guard", timeout=30)
    for o in out:
        assert o["error"] == "SideChannelError", o
        assert o["calls"][0].startswith("barrier (call 1)")
        assert o["calls"][1].startswith("FirstRankPerNode 'local' (call 1)")


def _in_two_threads(run: Callable[[str], None], timeout: float = 60) -> list[str]:
    """``run("t0")`` and ``run("t1")`` in threads "loader-0" and "loader-1" (the same names on
    every rank); returns the names of those still running after ``timeout``."""
    threads = [threading.Thread(target=run, args=(f"t{n}",), name=f"loader-{n}")
               for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return [thread.name for thread in threads if thread.is_alive()]


def _threads(world: int, shared: bool) -> dict:
    """Two threads, 100 guards each; a waiting rank checks that its first rank's block ran."""
    early: list = []
    errors: list = []
    common = FirstRankPerNode(local=False, timeout=timedelta(seconds=60))
    store = dist.distributed_c10d._get_default_store()

    def run(name: str) -> None:
        try:
            for i in range(100):
                guard = common if shared else FirstRankPerNode(local=False)
                with guard as first:
                    if first:  # add(), not set(): a set is not acknowledged (fire-and-forget),
                        store.add(f"threads/{name}/{i}", 1)  # a check elsewhere may miss it
                    elif not store.check([f"threads/{name}/{i}"]):
                        early.append(f"{name}/{i}")
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(f"{type(exc).__name__}: {exc}")

    alive = _in_two_threads(run)
    return {"early": early, "errors": errors, "alive": bool(alive)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_guards_from_two_threads_never_pair_crosswise(world: int, shared: bool) -> None:
    out = run_distributed(_threads, world, world, shared, timeout=90)
    assert all(o == {"early": [], "errors": [], "alive": False} for o in out), out


def _barriers_from_two_threads() -> list:
    """Two threads each make 20 barriers (every other one logged) on the same group."""
    errors: list = []

    def run(name: str) -> None:
        try:
            for i in range(20):
                if i % 2:
                    barrier_and_log(f"{name} step {i}")
                else:
                    _barrier_with_timeout(timedelta(seconds=30))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    alive = _in_two_threads(run)
    return errors + [f"{name} still running" for name in alive]


def test_barriers_from_two_threads_pair_by_thread() -> None:
    assert run_distributed(_barriers_from_two_threads, 4, timeout=90) == [[]] * 4


def _lane_warnings() -> list:
    """Lanes taken from an unnamed thread, a default-named pool worker and a named thread."""
    import concurrent.futures
    import logging

    from accel_utils._side import lane_for

    warned: list = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.args[0])
    logger = logging.getLogger("accel_utils.side_channel")
    logger.addHandler(handler)
    try:  # lanes only (no collective): default names may differ between ranks, the point
        for thread in (threading.Thread(target=lane_for, args=(dist.group.WORLD,)),
                       threading.Thread(target=lane_for, args=(dist.group.WORLD,),
                                        name="loader")):
            thread.start()
            thread.join(30)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(lane_for, dist.group.WORLD).result(30)
    finally:
        logger.removeHandler(handler)
    return [name.split("-")[0] for name in warned]


def test_a_thread_with_a_default_name_is_told_to_name_it() -> None:
    # lanes pair threads across ranks by name; "Thread-7" on one rank may be "Thread-6" on another
    assert run_distributed(_lane_warnings, 2, timeout=60) == [["Thread", "ThreadPoolExecutor"]] * 2


def _first_lanes_from_two_threads() -> int:
    """Two threads take their first lanes on a fresh group at once; each must keep its lane."""
    from accel_utils._side import lanes as side_channel

    group = dist.new_group(backend="gloo")
    lookup = side_channel._lanes.get

    def slow_miss(parent: object) -> object:  # widens the window between a miss and its fill
        found = lookup(parent)
        if found is None:
            time.sleep(0.2)
        return found

    side_channel._lanes.get = slow_miss
    start, lost = threading.Barrier(2), []

    def take(name: str) -> None:
        start.wait()
        lane = side_channel.lane_for(group)
        start.wait()
        if side_channel.lane_for(group) is not lane:
            lost.append(name)

    try:
        _in_two_threads(take, timeout=30)
    finally:
        del side_channel._lanes.get
    return len(lost)


def test_threads_taking_their_first_lanes_at_once_each_keep_theirs() -> None:
    # a lane lost to a concurrent first use restarts its call numbers at 0 on one rank only
    assert run_distributed(_first_lanes_from_two_threads, 2, timeout=60) == [0, 0]


def _huge_timeouts() -> list:
    out = []
    for timeout in (timedelta(days=365000), timedelta.max, 1e12):
        with FirstRankPerNode(timeout=timeout) as first:
            out.append(first)
        out.append(_barrier_with_timeout(timeout))
    return out


def test_huge_timeouts_are_clamped_not_false_timeouts() -> None:
    out = run_distributed(_huge_timeouts, 2, timeout=30)
    assert out == [[True, True] * 3, [False, True] * 3]


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def _unprintable() -> dict:
    try:
        with FirstRankPerNode():
            if dist.get_rank() == 0:
                raise _Unprintable()
    except FirstRankFailedError as exc:
        return _outcome(exc)
    except _Unprintable:
        return {"own": True}
    return {}


def test_an_exception_whose_str_raises_still_gives_a_clear_report() -> None:
    out = run_distributed(_unprintable, 2, timeout=30)
    assert out[0] == {"own": True}
    assert out[1]["exc_type"] == "_Unprintable"
    assert "str() of this _Unprintable" in out[1]["message"]


@pytest.mark.parametrize("error", [
    FirstRankFailedError(2, 1, "ValueError", "boom"),
    BarrierTimeoutError([2], 5.0, "FirstRankPerNode", [3], {2: 1, 3: 1}),
    RanksNotRespondingError([2, 3], 30.0, "barrier", {2: 1, 3: 1}),
    SideChannelError("mismatch", {0: "a", 1: "b"}, [1]),
])
def test_errors_pickle_with_their_attributes(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)


_NAMES = ("rank", "missing_ranks", "unresponsive_ranks", "ranks")


@pytest.mark.parametrize("first_fault", ["raise", "kill", "stop", "slow"])
@pytest.mark.parametrize("waiting_fault", ["kill", "stop"])
def test_fault_matrix_every_survivor_raises_and_nobody_passes(first_fault: str,
                                                              waiting_fault: str) -> None:
    # node 1's first rank and its waiting rank both fail; node 0's ranks must say so
    out = _run(first_fault, waiting_fault, timeout_s=4 if first_fault == "slow" else 3600,
               liveness_s=2.0)
    for rank in (0, 1):
        assert "error" in out[rank] and "passed" not in out[rank], out[rank]
        named = {r for key in _NAMES for r in (lambda v: v if isinstance(v, list) else [v])(
            out[rank].get(key, []))}
        assert named & {2, 3}, out[rank]
    for rank in (2, 3):  # the faulty ranks: dead, or they raised too once resumed
        assert isinstance(out[rank], RankFailure) or "passed" not in out[rank], out[rank]


def test_a_failing_first_rank_and_the_waiting_ranks_exit_while_another_first_rank_works(
) -> None:
    port = free_port()
    procs = []
    for rank in range(4):
        env = launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                         WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                         GROUP_RANK=str(rank // 2))
        procs.append(subprocess.Popen([sys.executable, "tests/scripts/leave_at_once.py", "60"],
                                      env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        for proc in procs[1:]:  # rank 0 sleeps 60 s in its block: they must not wait for it
            proc.wait(timeout=40)
        assert procs[0].poll() is None, "rank 0 should still be inside its block"
        outputs = [proc.communicate()[0] for proc in procs[1:]]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert "RAISED rank=2 ValueError" in outputs[1], outputs
    for out in (outputs[0], outputs[2]):
        assert "FirstRankFailedError" in out, outputs


def _wrong_interface_on_rank_one() -> dict:
    import os

    from accel_utils import barrier

    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    if dist.get_rank() == 1:
        os.environ["GLOO_SOCKET_IFNAME"] = "nope0"  # no such interface on this host
    start = time.monotonic()
    try:
        barrier(timeout=60)
    except (BarrierTimeoutError, SideChannelError) as exc:
        return {**_outcome(exc), "after": time.monotonic() - start}
    finally:
        if saved is None:  # pooled workers run later tests
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved
    return {}


def test_a_creation_error_is_reported_as_itself_not_as_a_timeout() -> None:
    # was wrapped as "Timed out creating ...": a BarrierTimeoutError "after 60s" naming nobody
    out = run_distributed(_wrong_interface_on_rank_one, 2, timeout=60)
    for o in out:
        assert o["error"] == "SideChannelError", o
        assert o["ranks"] == [1] and "nope0" in o["message"], o
        assert "rank 1 (node 0) could not create" in o["message"], o
        assert o["after"] < 20, o
