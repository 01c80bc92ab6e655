"""reduce_loss on real gloo groups: equal to one process over the union of micro-batches, one
collective per call (the first included), an exact int64 denominator, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from accel_utils import reduce_loss
from accel_utils.loss import _reduce_on_device
from tests.harness import run_distributed
from tests.stacks import needs_parallelism_config

BARE_LAUNCHER = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_RANK": None,
                 "GROUP_WORLD_SIZE": None}


def _rank_data(rank: int) -> tuple[list[torch.Tensor], int]:
    """Rank ``rank``'s micro-batch loss sums (uneven count per rank) and token count."""
    g = torch.Generator().manual_seed(rank)
    n = 2 + rank % 3
    return [torch.rand((), generator=g) * 50 for _ in range(n)], 97 * (rank + 1) + 3 * rank


def _expected(world: int, per_token: bool) -> tuple[float, int]:
    data = [_rank_data(r) for r in range(world)]
    loss = sum(float(x) for losses, _ in data for x in losses)
    denom = sum(t if per_token else len(losses) for losses, t in data)
    return loss, denom


def _describe(loss: torch.Tensor, denom: torch.Tensor) -> dict:
    return {"loss": float(loss), "denom": int(denom), "dtypes": (loss.dtype, denom.dtype),
            "shapes": (tuple(loss.shape), tuple(denom.shape)),
            "grad": loss.requires_grad or denom.requires_grad,
            "devices": (loss.device.type, denom.device.type)}


def _count(names=("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier",
                  "all_gather_into_tensor", "reduce_scatter_single", "all_gather_single")):
    """Count calls of every torch.distributed collective (the real ones still run)."""
    calls: list[str] = []
    real = {n: getattr(dist, n) for n in names}

    def wrap(name):
        def counted(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return counted

    for n in names:
        setattr(dist, n, wrap(n))

    def restore() -> None:
        for n, fn in real.items():
            setattr(dist, n, fn)

    return calls, restore


def _reduce_everywhere(handle_kind: str) -> dict:
    from accelerate import PartialState

    rank = dist.get_rank()
    losses, tokens = _rank_data(rank)
    losses[0] = losses[0].clone().requires_grad_()  # a loss still in the graph: result detached
    handle = {"group": dist.group.WORLD, "state": PartialState(cpu=True),
              "subgroup": dist.new_group(list(range(dist.get_world_size())))}[handle_kind]
    calls, restore = _count()
    try:
        out = {
            "first": _describe(*reduce_loss(losses, torch.tensor(tokens), dp_group=handle)),
            "first_calls": list(calls),
            "int_tokens": _describe(*reduce_loss(losses, tokens, dp_group=handle)),
            "per_batch": _describe(*reduce_loss(losses, torch.tensor(tokens), False, handle)),
            "device_path": _describe(*_reduce_on_device(losses, torch.tensor(tokens), handle)),
            "device_per_batch": _describe(*_reduce_on_device(losses, len(losses), handle)),
        }
        out["calls_total"] = len(calls)
        before = len(calls)
        out["default"] = _describe(*reduce_loss(losses, tokens))  # dp_group=None: default group
        out["default_calls"] = len(calls) - before
    finally:
        restore()
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_equals_one_process_over_all_micro_batches_in_one_collective(world_size: int) -> None:
    out = run_distributed(_reduce_everywhere, world_size, "group", env=BARE_LAUNCHER)
    loss, tokens = _expected(world_size, True)
    _, batches = _expected(world_size, False)
    for o in out:
        # the first call, without launcher variables, is exactly one collective: no host gather
        assert o["first_calls"] == ["all_reduce"]
        assert o["calls_total"] == 5  # one per call
        for key, want in (("first", tokens), ("int_tokens", tokens), ("per_batch", batches),
                          ("device_path", tokens), ("device_per_batch", batches)):
            got = o[key]
            assert got["loss"] == pytest.approx(loss, rel=1e-6), key
            assert got["denom"] == want, key
            assert got["dtypes"] == (torch.float32, torch.int64), key
            assert got["shapes"] == ((1,), (1,)) and got["grad"] is False, key
            assert got["devices"] == ("cpu", "cpu")
        # None means the default group (the seed reduced nothing): here the whole world
        assert o["default"]["loss"] == pytest.approx(loss, rel=1e-6)
        assert o["default"]["denom"] == tokens and o["default_calls"] == 1


@pytest.mark.stack
@pytest.mark.parametrize("kind", ["state", "subgroup"])
def test_accepts_partial_state_and_process_groups(kind: str) -> None:
    out = run_distributed(_reduce_everywhere, 2, kind)
    loss, tokens = _expected(2, True)
    for o in out:
        assert o["first"]["denom"] == tokens and o["first"]["loss"] == pytest.approx(loss, rel=1e-6)
        assert o["first_calls"] == ["all_reduce"]


def _huge_and_nan() -> dict:
    rank = dist.get_rank()
    huge = 3_000_000_000 + rank  # more than int32 and float32 can hold exactly
    one, world = [torch.tensor(1.0)], dist.group.WORLD
    out = {
        "huge": int(reduce_loss(one, torch.tensor(huge), dp_group=world)[1]),
        "huge_int": int(reduce_loss(one, huge, dp_group=world)[1]),
        "huge_device": int(_reduce_on_device(one, torch.tensor(huge), world)[1]),
    }
    kept = reduce_loss([torch.tensor(3.0)], 4, dp_group=dist.group.WORLD)
    losses = [torch.tensor(float("nan")) if rank == 1 else torch.tensor(2.0)]
    out["nan"] = float(reduce_loss(losses, 5, dp_group=dist.group.WORLD)[0])
    out["kept"] = (float(kept[0]), int(kept[1]))  # results never alias the reused send buffer
    return out


def test_huge_denominator_is_exact_and_nan_is_reduced_as_is() -> None:
    for o in run_distributed(_huge_and_nan, 2):
        assert o["huge"] == o["huge_int"] == o["huge_device"] == 6_000_000_001
        assert math.isnan(o["nan"])
        assert o["kept"] == (6.0, 8)


def _over_mesh_dp_not_tp() -> dict:
    # Accelerate's mesh (dp_shard x tp); the loss is reduced over dp only: tp peers hold the
    # same micro-batches and must not be counted twice.
    from accelerate.parallelism_config import ParallelismConfig

    mesh = ParallelismConfig(dp_shard_size=2, tp_size=2).build_device_mesh("cpu")
    dp_rank = dist.get_rank() // 2
    losses, tokens = _rank_data(dp_rank)
    loss, denom = reduce_loss(losses, tokens, dp_group=mesh)
    return {"loss": float(loss), "denom": int(denom)}


@pytest.mark.stack
@needs_parallelism_config
def test_reduces_over_data_parallel_ranks_not_tensor_parallel() -> None:
    loss, tokens = _expected(2, True)
    for o in run_distributed(_over_mesh_dp_not_tp, 4):
        assert o["denom"] == tokens and o["loss"] == pytest.approx(loss, rel=1e-6)


def _bad_counts_in_the_collective() -> dict:
    losses = [torch.tensor(2.0), torch.tensor(3.0)]
    calls, restore = _count()
    out = {}
    try:
        cases = (("float", 5.7, losses), ("float_tensor", torch.tensor(5.7), losses),
                 ("meta", 4, [torch.tensor(1.0, device="meta")]))
        for key, tokens, store in cases:
            before = len(calls)
            try:
                reduce_loss(store, tokens)
                out[key] = "no error"
            except (TypeError, ValueError) as exc:
                out[key] = type(exc).__name__
            out[key + "_calls"] = len(calls) - before
        before = len(calls)
        loss, denom = reduce_loss(losses, 6.0)  # a whole float count is a count: accepted, exact
        out["whole"] = (float(loss), int(denom), len(calls) - before)
    finally:
        restore()
    return out


def test_non_integer_counts_and_meta_losses_refused_in_the_one_collective() -> None:
    for o in run_distributed(_bad_counts_in_the_collective, 4):
        # 4 ranks x 5.7 tokens used to reduce to 22 without a word
        assert o["float"] == o["float_tensor"] == o["meta"] == "ValueError", o
        # a refused call still makes its one collective (carrying the refusal), so that a
        # rank refused alone stays in step with the others (see the retry test below)
        assert o["float_calls"] == o["float_tensor_calls"] == o["meta_calls"] == 1
        assert o["whole"] == (20.0, 24, 1)


def test_single_process_without_group() -> None:
    assert not dist.is_initialized()
    losses = [torch.tensor(1.5), torch.tensor([2.5])]
    loss, denom = reduce_loss(losses, 7, dp_group=dist.group.WORLD)
    assert (float(loss), int(denom)) == (4.0, 7)


@pytest.mark.parametrize("reduce", [reduce_loss, _reduce_on_device], ids=["host", "device"])
@pytest.mark.parametrize(
    "losses,tokens,exc,words",
    [
        ([], 3, ValueError, "non-empty"),
        (torch.tensor([1.0, 2.0]), 3, ValueError, "non-empty list"),
        ([torch.tensor([1.0, 2.0])], 3, ValueError, "one scalar loss"),
        ([torch.tensor(1.0), 2.0], 3, TypeError, "torch.Tensor"),
        ([torch.tensor(1.0)], -1, ValueError, "non-negative"),
        ([torch.tensor(1.0)], torch.tensor(-4), ValueError, "non-negative"),
        ([torch.tensor(1.0)], torch.tensor([3, 4]), ValueError, "one token count"),
        ([torch.tensor(1.0)], "7", ValueError, "non-negative integer"),
        ([torch.tensor(1.0)], 5.7, ValueError, "whole number"),
        ([torch.tensor(1.0)], torch.tensor(5.7), ValueError, "whole number"),
        ([torch.tensor(1.0)], float("nan"), ValueError, "whole number"),
        ([torch.tensor(1.0)], float("inf"), ValueError, "whole number"),
        ([torch.tensor(1.0, device="meta")], 3, ValueError, "meta"),
        ([torch.tensor(1.0), torch.tensor(2.0, device="meta")], 3, ValueError, "meta"),
        ([torch.tensor(1.0)], torch.tensor(3, device="meta"), ValueError, "meta"),
    ],
)
def test_bad_input_says_what_was_expected(reduce, losses, tokens, exc, words) -> None:
    with pytest.raises(exc, match=words):
        reduce(losses, tokens)


def _group_spellings() -> dict:
    from accelerate import Accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    losses = [torch.tensor(float(rank + 1))]
    solo = dist.new_group([rank], use_local_synchronization=True)  # this rank alone
    accelerator = Accelerator(cpu=True)
    out: dict = {"world": world}
    for name, kwargs in {
        "group": {"group": dist.group.WORLD},
        "dp_group": {"dp_group": dist.group.WORLD},
        "positional": {},  # the seed's position: reduce_loss(losses, tokens, True, group)
        "group_accelerator": {"group": accelerator},
        "group_solo": {"group": solo},
        "dp_group_solo": {"dp_group": solo},
    }.items():
        args = (losses, 3, True, dist.group.WORLD) if name == "positional" else (losses, 3)
        loss, denom = reduce_loss(*args, **kwargs)
        out[name] = (float(loss), int(denom))
    for name, kwargs in {
        "both": {"group": dist.group.WORLD, "dp_group": dist.group.WORLD},
        "both_positional": {"group": solo},
    }.items():
        args = (losses, 3, True, dist.group.WORLD) if name == "both_positional" else (losses, 3)
        try:
            reduce_loss(*args, **kwargs)
            out[name] = "no error"
        except TypeError as exc:
            out[name] = str(exc)
    dist.barrier()  # no rank reduced alone above: the next test's collectives stay paired
    return out


def test_group_and_the_seeds_dp_group_name_the_same_parameter() -> None:
    for rank, o in enumerate(run_distributed(_group_spellings, 2, timeout=90)):
        total = (float(sum(range(1, o["world"] + 1))), 3 * o["world"])
        assert o["group"] == o["dp_group"] == o["positional"] == o["group_accelerator"] == total
        assert o["group_solo"] == o["dp_group_solo"] == (float(rank + 1), 3)  # really used
        for name in ("both", "both_positional"):
            assert "both group= and dp_group=" in o[name], o[name]


# ------------------------------------------------------------ input users really pass (issue 25)
@pytest.mark.parametrize("reduce", [reduce_loss, _reduce_on_device], ids=["host", "device"])
@pytest.mark.parametrize("count", [np.int64(7), np.uint16(7), np.array(7), np.array([7]),
                                   np.float32(7.0)], ids=repr)
def test_numpy_counts_are_counts(reduce, count) -> None:
    # data code counts tokens with numpy: mask.sum() is a numpy.int64
    loss, denom = reduce([torch.tensor(1.5)], count)
    assert (float(loss), int(denom)) == (1.5, 7)


@pytest.mark.parametrize("reduce", [reduce_loss, _reduce_on_device], ids=["host", "device"])
@pytest.mark.parametrize("count", [2**60 + 1, 2**53, torch.tensor(2**60 + 1), np.int64(2**62),
                                   float(2**60), torch.tensor(float(2**53))], ids=repr)
def test_counts_beyond_the_exact_range_are_refused(reduce, count) -> None:
    # the count travels as a float64: 2**60 + 1 came back as 2**60
    with pytest.raises(ValueError, match=r"2\*\*53"):
        reduce([torch.tensor(1.0)], count)


@pytest.mark.parametrize("reduce", [reduce_loss, _reduce_on_device], ids=["host", "device"])
def test_the_largest_exact_count_is_exact(reduce) -> None:
    for count in (2**53 - 1, torch.tensor(2**53 - 1), np.int64(2**53 - 1)):
        assert int(reduce([torch.tensor(1.0)], count)[1]) == 2**53 - 1


@pytest.mark.parametrize("reduce", [reduce_loss, _reduce_on_device], ids=["host", "device"])
def test_complex_loss_says_so(reduce) -> None:
    # was a bare "float() argument must be ... not 'complex'" (host), a dropped imaginary part
    # with a ComplexWarning (device)
    with pytest.raises(TypeError, match=r"loss_store\[1\] is complex"):
        reduce([torch.tensor(1.0), torch.tensor(1 + 2j)], 3)


def _sums_past_the_exact_range() -> dict:
    # each count is exact on its rank; their sum is not (2**52 + 2**51 twice: 1.5 * 2**53)
    out = {}
    for key, reduce in (("host", reduce_loss), ("device", _reduce_on_device)):
        calls, restore = _count()
        try:
            reduce([torch.tensor(1.0)], 2**52 + 2**51 + dist.get_rank())
            out[key] = "no error"
        except ValueError as exc:
            out[key] = str(exc)
        finally:
            restore()
        out[key + "_calls"] = len(calls)
    out["after"] = (int(reduce_loss([torch.tensor(1.0)], 2**52 - 1)[1]), 2 * (2**52 - 1))
    return out


def test_a_sum_past_the_exact_range_raises_on_every_rank_in_one_collective() -> None:
    for o in run_distributed(_sums_past_the_exact_range, 2):
        for key in ("host", "device"):
            assert "sum" in o[key] and "2**53" in o[key], o[key]
            assert o[key + "_calls"] == 1
        assert o["after"][0] == o["after"][1]


def _retry_after_a_refusal(path: str, bad) -> dict:
    # A user's loop that catches the ValueError and retries the call: rank 1's count is bad.
    # Before, rank 1 raised alone and its retry paired with rank 0's first call: (2., 10) came
    # back on rank 0 with no error anywhere.
    reduce = {"host": reduce_loss, "device": _reduce_on_device}[path]
    rank = dist.get_rank()
    first = (bad if rank == 1 else 10, [torch.tensor(1.0 + rank)])
    out: dict = {"first": None}
    calls, restore = _count()
    try:
        try:
            loss, denom = reduce(first[1], first[0])
            out["first"] = ("ok", float(loss), int(denom))
        except (TypeError, ValueError) as exc:
            out["first"] = (type(exc).__name__, str(exc))
        out["first_calls"] = len(calls)
        if out["first"][0] != "ok":  # refused: retry with a good count
            loss, denom = reduce([torch.tensor(3.0)], 5)
            out["retry"] = (float(loss), int(denom))
    finally:
        restore()
    return out


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("bad", [-1, 5.7, "7", 2**60], ids=repr)
def test_a_refused_call_raises_on_every_rank_and_keeps_them_in_step(path: str, bad) -> None:
    out = run_distributed(_retry_after_a_refusal, 2, path, bad, timeout=30)
    for o in out:
        assert o["first"][0] in ("ValueError", "TypeError"), o  # every rank raises ...
        assert o["first_calls"] == 1  # ... after the call's one collective
        assert o["retry"] == (6.0, 10)  # the retries pair with each other
    kind, text = out[0]["first"]
    assert kind == "ValueError" and "rank 1" in text, text  # the good rank names the bad one
    assert "total_num_tokens" in out[1]["first"][1]  # the bad rank raises its own error


def _bad_losses_on_one_rank(case: str) -> dict:
    rank = dist.get_rank()
    bad = {"empty": [], "not_tensor": [torch.tensor(1.0), 2.0], "complex": [torch.tensor(1j)],
           "meta": [torch.tensor(1.0, device="meta")], "vector": [torch.tensor([1.0, 2.0])]}
    losses = bad[case] if rank == 2 else [torch.tensor(1.0)]
    out: dict = {}
    for attempt in ("first", "retry"):
        try:
            loss, denom = reduce_loss(losses, 4)
            out[attempt] = ("ok", float(loss), int(denom))
        except (TypeError, ValueError) as exc:
            out[attempt] = (type(exc).__name__, str(exc))
        losses = [torch.tensor(1.0)]
    return out


@pytest.mark.parametrize("case", ["empty", "not_tensor", "complex", "meta", "vector"])
def test_bad_losses_on_one_rank_raise_on_every_rank(case: str) -> None:
    out = run_distributed(_bad_losses_on_one_rank, 3, case, timeout=30)
    for rank, o in enumerate(out):
        assert o["first"][0] in ("ValueError", "TypeError"), (rank, o)
        if rank != 2:
            assert "rank 2" in o["first"][1], o
        assert o["retry"] == ("ok", 3.0, 12)

