"""FirstRankPerNode on real gloo process groups: ordering, failures, deaths, timeouts, handles."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from accel_utils import BarrierTimeoutError, FirstRankFailedError, FirstRankPerNode, resolve
from accel_utils._side import tree
from accel_utils.shared_dir import path_is_shared
from tests.harness import run_distributed, run_torchrun


def _interval(guard: FirstRankPerNode, nap: float) -> dict:
    with guard as first:
        start = time.time()
        if first:
            time.sleep(nap)
        end = time.time()
    return {"first": first, "start": start, "end": end}


def _ordering(local: bool) -> dict:
    return _interval(FirstRankPerNode(local=local), 1.0)


def test_each_node_first_rank_goes_first_and_both_run_concurrently() -> None:
    out = run_distributed(_ordering, 4, True, nodes=2)
    assert [o["first"] for o in out] == [True, False, True, False]
    latest_first_end = max(out[0]["end"], out[2]["end"])
    for waiting in (1, 3):  # nobody leaves before every first rank finished
        assert out[waiting]["start"] >= latest_first_end
    assert out[0]["start"] < out[2]["end"] and out[2]["start"] < out[0]["end"]


def test_global_order_lets_only_rank_zero_go_first() -> None:
    out = run_distributed(_ordering, 4, False, nodes=2)
    assert [o["first"] for o in out] == [True, False, False, False]
    assert all(out[r]["start"] >= out[0]["end"] for r in (1, 2, 3))


def test_single_process_goes_first_at_no_cost() -> None:
    assert not dist.is_initialized()
    with FirstRankPerNode() as first:
        assert first is True
    assert _decorated(21) == 42


@FirstRankPerNode(timeout=timedelta(seconds=60))
def _decorated(x: int) -> int:
    with FirstRankPerNode():  # nested on the same group: ordered by the outer guard already
        return 2 * x


def _decorator_and_nesting() -> list:
    return [_decorated(dist.get_rank()) for _ in range(3)]


def test_decorator_returns_values_and_nests() -> None:
    out = run_distributed(_decorator_and_nesting, 4, nodes=2)
    assert out == [[0, 0, 0], [2, 2, 2], [4, 4, 4], [6, 6, 6]]


def _conflicting_nesting() -> str:
    # the inner guard would wait on ranks held by the outer one
    with FirstRankPerNode(local=True), FirstRankPerNode(local=False):
        pass
    return "no error"


def test_nesting_that_would_deadlock_is_refused() -> None:
    out = run_distributed(_conflicting_nesting, 4, nodes=2, expect_ok=False)
    for rank in (0, 2):
        assert out[rank].exc_type == "ValueError" and "same order" in out[rank].message
    for rank in (1, 3):
        assert out[rank].exc_type == "FirstRankFailedError"


def _failing(fail_rank: int, other_first_nap: float, kill: bool) -> dict:
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("accel_utils").addHandler(handler)
    record = {}
    try:
        with FirstRankPerNode() as first:
            if dist.get_rank() == fail_rank:
                if kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("tokenizer exploded")
            if first:
                time.sleep(other_first_nap)
                record["first_done"] = time.time()
    except FirstRankFailedError as exc:
        record.update(raised=time.time(), rank=exc.rank, node=exc.node, exc_type=exc.exc_type,
                      message=str(exc))
    except ValueError as exc:  # returned, not raised: every rank then leaves the task cleanly
        record.update(own=f"ValueError: {exc}")
    finally:
        logging.getLogger("accel_utils").removeHandler(handler)
    if not kill:  # the job may go on: the next guard works on every rank
        with FirstRankPerNode() as first:
            record["again"] = first
    return record


def test_a_failing_first_rank_makes_every_rank_raise() -> None:
    out = run_distributed(_failing, 4, 2, 0.0, False, nodes=2, timeout=5)
    assert out[2] == {"own": "ValueError: tokenizer exploded", "again": True}
    for rank in (0, 1, 3):
        assert (out[rank]["rank"], out[rank]["node"], out[rank]["exc_type"]) == (2, 1, "ValueError")
        assert "tokenizer exploded" in out[rank]["message"]
    assert [o["again"] for o in out] == [True, False, True, False]
    from tests.harness import _pools

    assert "failed in its FirstRankPerNode block: ValueError" in _pools[4].last_output


def test_failure_is_reported_while_another_first_rank_is_still_busy() -> None:
    out = run_distributed(_failing, 4, 2, 3.0, False, nodes=2, timeout=10)
    for rank in (1, 3):  # they heard of rank 2's failure before rank 0 finished its block
        assert out[rank]["rank"] == 2 and out[rank]["raised"] < out[0]["first_done"]
    assert out[0]["rank"] == 2  # and rank 0 refuses to go on once it is done


def test_a_killed_first_rank_is_named_by_the_survivors() -> None:
    out = run_distributed(_failing, 4, 2, 0.0, True, nodes=2, timeout=5, expect_ok=False)
    assert out[2].exc_type == "died"
    for rank in (0, 1, 3):
        assert (out[rank]["rank"], out[rank]["node"], out[rank]["exc_type"]) == (2, 1, "died")


def test_killed_first_rank_under_torchrun_on_two_nodes() -> None:
    # torchrun stops the dead rank's node-mates itself; node 0's ranks must fail on their own
    runs = run_torchrun(["tests/scripts/guard_worker.py", "kill"], nnodes=2, timeout=60)
    assert all(run.returncode != 0 for run in runs)
    node0 = runs[0].output
    for rank in (0, 1):
        line = f"GUARD rank={rank} FirstRankFailedError rank=2 node=1 type=died"
        assert line in node0, node0[-3000:]


def _slow_first_rank() -> dict:
    try:
        with FirstRankPerNode(timeout=timedelta(seconds=2)):
            if dist.get_rank() == 2:
                time.sleep(4)
    except BarrierTimeoutError as exc:
        return {"missing": exc.missing_ranks, "timeout_s": exc.timeout_s}
    return {}


def test_a_first_rank_past_the_timeout_is_named() -> None:
    out = run_distributed(_slow_first_rank, 4, nodes=2, timeout=10)
    for rank in (0, 1, 3):
        assert out[rank] == {"missing": [2], "timeout_s": 2.0}
    assert out[2]["missing"] == [2]  # the late rank hears why the others left


def _waiting_rank_fails_itself() -> str:
    try:
        with FirstRankPerNode() as first:
            if not first:
                raise KeyError("my own bug")
    except KeyError as exc:  # returned, not raised: both ranks then leave the task cleanly
        return f"KeyError: {exc}"
    return "ok"


def test_a_waiting_rank_raises_its_own_exception() -> None:
    assert run_distributed(_waiting_rank_fails_itself, 2) == ["ok", "KeyError: 'my own bug'"]


def _handles() -> dict:
    from accelerate import Accelerator, PartialState
    from torch.distributed.device_mesh import init_device_mesh

    pair = dist.new_group([0, 1])
    mesh = init_device_mesh("cpu", (4,))
    roles = {}
    for name, handle in [("none", None), ("world", dist.group.WORLD), ("mesh", mesh),
                         ("state", PartialState(cpu=True)), ("accelerator", Accelerator(cpu=True))]:
        with FirstRankPerNode(handle) as first:
            roles[name] = first
    if dist.get_rank() in (0, 1):  # only the pair's members take part
        with FirstRankPerNode(pair, local=False) as first:
            roles["pair"] = first
    return roles


@pytest.mark.stack
def test_accepts_every_handle_kind_and_subgroups() -> None:
    out = run_distributed(_handles, 4, nodes=2)
    for rank, roles in enumerate(out):
        for name in ("none", "world", "mesh", "state", "accelerator"):
            assert roles[name] is (rank % 2 == 0), (rank, name)
    assert out[0]["pair"] is True and out[1]["pair"] is False
    assert "pair" not in out[2]


def _auto(base: str, per_node: bool) -> dict:
    node = resolve().nodes.node_rank
    path = os.path.join(base, f"node{node}") if per_node else base
    shared = path_is_shared(path)
    with FirstRankPerNode(local="auto", path=path) as first:
        pass
    with FirstRankPerNode(local="auto", path=path):  # decided once, not probed again
        pass
    return {"shared": shared, "first": first, "left": sorted(os.listdir(path))}


@pytest.mark.parametrize("per_node", [False, True])
def test_auto_order_follows_whether_the_directory_is_shared(tmp_path, per_node: bool) -> None:
    out = run_distributed(_auto, 4, str(tmp_path), per_node, nodes=2)
    assert all(o["shared"] is (not per_node) for o in out)
    expected = [True, False, True, False] if per_node else [True, False, False, False]
    assert [o["first"] for o in out] == expected
    assert all(o["left"] == [] for o in out)  # the markers are cleaned up


def test_bad_arguments_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        FirstRankPerNode(local="yes")
    with pytest.raises(ValueError, match="path= is required"):
        FirstRankPerNode(local="auto")
    with pytest.raises(ValueError, match="only allowed"):
        FirstRankPerNode(path="/tmp")
    with pytest.raises(TypeError, match="path must be"):
        FirstRankPerNode(local="auto", path=3)


def _example(order: str, cache_dir: str, nnodes: int) -> tuple[dict, list[str], str]:
    runs = run_torchrun(["examples/preprocess_guard.py", "--order", order, "--cache-dir",
                         cache_dir, "--rows", "300"], nnodes=nnodes, timeout=90)
    output = "".join(run.output for run in runs)
    assert all(run.returncode == 0 for run in runs), output[-4000:]
    lines = output.splitlines()
    calls = json.loads(next(x for x in lines if x.startswith("MAP_CALLS ")).split(" ", 1)[1])
    ranks = [x for x in lines if x.startswith("PREPROCESS ")]
    assert len(ranks) == 2 * nnodes and "SAME_DATASET True" in lines
    return calls, ranks, output


def test_example_tokenizes_once_per_node_with_node_local_caches(tmp_path) -> None:
    calls, _, _ = _example("local", str(tmp_path / "node{node}"), nnodes=2)
    assert calls == {"0": 1, "1": 1}


def test_example_auto_order_tokenizes_once_on_a_shared_cache(tmp_path) -> None:
    calls, ranks, output = _example("auto", str(tmp_path), nnodes=2)
    assert calls == {"0": 1, "1": 0}
    assert "shared between nodes -> global order" in output
    assert sum("first=True" in line for line in ranks) == 1


def test_example_global_order_on_one_node(tmp_path) -> None:
    calls, _, _ = _example("global", str(tmp_path), nnodes=1)
    assert calls == {"0": 1}


def _empty_guard_cost() -> dict:
    from accel_utils import _side

    with FirstRankPerNode():  # creates the side group and posts this rank's mark and node
        pass
    lane = _side.lane_for(dist.group.WORLD)
    before, setup_calls = lane.group._get_sequence_number_for_group(), lane.pulse.requests
    for _ in range(5):
        with FirstRankPerNode():
            pass
    return {"collectives": lane.group._get_sequence_number_for_group() - before,
            "store_calls": lane.pulse.requests - setup_calls, "setup_calls": setup_calls}


def test_an_empty_guard_costs_one_small_reduction_and_no_store_traffic() -> None:
    out = run_distributed(_empty_guard_cost, 4, nodes=2)
    # one reduction over the tree per guard: a message from each child and to each child,
    # one to the parent and one from it (gloo counts each send and receive)
    messages = [2 * (len(tree.children(r, 4)) + (r > 0)) for r in range(4)]
    assert messages == [4, 2, 4, 2]
    # setting up writes this rank's mark and node (the counting works), then nothing
    assert out == [{"collectives": 5 * m, "store_calls": 0, "setup_calls": 2}
                   for m in messages], out


def _probe_unwritable(path: str) -> str:
    try:
        path_is_shared(path)
    except OSError as exc:
        return str(exc)
    return "no error"


def test_a_directory_the_leaders_cannot_write_fails_on_every_rank(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = run_distributed(_probe_unwritable, 4, str(blocker / "cache"), nodes=2)
    assert all("2 node leader(s) could not write a marker" in o for o in out), out


def test_timeouts_that_are_not_a_finite_number_of_seconds_are_refused() -> None:
    for value in (float("nan"), float("inf"), -float("inf")):
        # nan was "cannot convert float NaN to integer", -inf an OverflowError
        with pytest.raises(ValueError, match="finite"):
            FirstRankPerNode(timeout=value)
    with pytest.raises(ValueError, match="finite"):
        FirstRankPerNode(liveness=float("nan"))
