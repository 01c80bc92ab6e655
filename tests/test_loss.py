"""reduce_loss on real gloo groups: equal to one process over the union of micro-batches, one
collective per call (the first included), an exact int64 denominator, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from accel_utils import reduce_loss
from accel_utils.loss import _reduce_on_device
from tests.harness import run_distributed

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


def test_reduces_over_data_parallel_ranks_not_tensor_parallel() -> None:
    loss, tokens = _expected(2, True)
    for o in run_distributed(_over_mesh_dp_not_tp, 4):
        assert o["denom"] == tokens and o["loss"] == pytest.approx(loss, rel=1e-6)


def _bad_counts_before_any_collective() -> dict:
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


def test_non_integer_counts_and_meta_losses_refused_before_the_collective() -> None:
    for o in run_distributed(_bad_counts_before_any_collective, 4):
        # 4 ranks x 5.7 tokens used to reduce to 22 without a word
        assert o["float"] == o["float_tensor"] == o["meta"] == "ValueError", o
        assert o["float_calls"] == o["float_tensor_calls"] == o["meta_calls"] == 0
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
