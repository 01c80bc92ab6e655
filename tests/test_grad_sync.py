"""get_sync_ctx on real gloo groups: gradients after accumulation equal one process's, and the
gradient reductions really are skipped (counted) until the optimizer step."""

from __future__ import annotations

import logging
import types
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from accel_utils import get_sync_ctx, reduce_loss
from tests.harness import run_distributed

V, H, K = 16, 8, 4  # vocabulary, hidden size, micro-batches per optimizer step


class TinyLM(nn.Module):
    """Three parameterised units (embed, mid, head), so FSDP2 counts are per unit x 3."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.mid = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.head = nn.Linear(H, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(ids)))


def _model() -> TinyLM:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return TinyLM()


def _batch(rank: int, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + k)
    ids = torch.randint(0, V, (2, 6), generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels.view(-1)[: (3 * rank + k) % 7] = -100  # uneven token counts per rank and micro-batch
    return ids, labels


def _loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _train(model: nn.Module, inner: nn.Module, loss_group, steps: int, sync_ctx) -> dict:
    """``steps`` optimizer steps of K micro-batches; per step, the max gradient error against one
    process computing the global batch, and the loss / denominator check."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ref = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    errors, loss_ok = [], []
    for step in range(steps):
        opt.zero_grad()
        store, tokens = [], 0
        for k in range(K):
            ids, labels = _batch(rank, step, k)
            with sync_ctx(k == K - 1):  # forward and backward inside the context
                loss = _loss_sum(model, ids, labels)
                loss.backward()
            store.append(loss.detach())
            tokens += int((labels != -100).sum())
        loss_sum, denom = reduce_loss(store, tokens, dp_group=loss_group)
        for p in model.parameters():  # DDP / FSDP average over ranks: undo that, divide by tokens
            p.grad.mul_(world / denom.item())
        # the reference: one process, the union of every rank's micro-batches
        ref_opt.zero_grad()
        batches = [_batch(r, step, k) for r in range(world) for k in range(K)]
        total = sum(_loss_sum(ref, ids, lab) for ids, lab in batches)
        ref_tokens = sum(int((lab != -100).sum()) for _, lab in batches)
        (total / ref_tokens).backward()
        ref_grads = dict(ref.named_parameters())
        err = 0.0
        for name, p in inner.named_parameters():
            full, want = _full(p.grad), ref_grads[name].grad
            torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-7)
            err = max(err, float((full - want).abs().max()))
        errors.append(err)
        loss_ok.append(int(denom) == ref_tokens and abs(float(loss_sum) - float(total)) < 1e-3)
        opt.step()
        ref_opt.step()
    return {"errors": errors, "loss_ok": loss_ok}


# ----------------------------------------------------------------------------- DDP


def _counting_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.append(1)
    return allreduce_hook(None, bucket)


def _ddp_run(static_graph: bool, use_ctx: bool, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_model(), static_graph=static_graph)
    calls: list[int] = []
    ddp.register_comm_hook(calls, _counting_hook)

    def ctx(last: bool):
        return get_sync_ctx(ddp, last) if use_ctx else nullcontext()

    out = _train(ddp, ddp.module, dist.group.WORLD, steps, ctx)
    # the comm hook runs once per bucket and synced backward (the tiny model is one bucket)
    return out | {"hook_calls_per_step": len(calls) / steps}


def _ddp_cases() -> dict:
    return {
        "ctx": _ddp_run(False, True, 2),
        "plain": _ddp_run(False, False, 2),
        "static": _ddp_run(True, True, 3),
    }


def test_ddp_accumulation_equals_one_process_and_syncs_once_per_step() -> None:
    out = run_distributed(_ddp_cases, 2)
    for rank in out:
        assert rank["ctx"]["hook_calls_per_step"] == 1
        assert rank["plain"]["hook_calls_per_step"] == K
        for case in ("ctx", "plain", "static"):
            assert all(rank[case]["loss_ok"]), case
            assert max(rank[case]["errors"]) < 1e-6, case
        # static graph: synced until the graph is recorded (first micro-batch), then no_sync
        assert len(rank["static"]["errors"]) == 3


def _ddp_wrappers() -> dict:
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_model())
    seen = {}
    compiled = torch.compile(ddp, backend="eager")  # compiles lazily: only the wrapper is needed
    with get_sync_ctx(compiled, False):
        seen["compiled_inside"] = ddp.require_backward_grad_sync
    seen["compiled_after"] = ddp.require_backward_grad_sync
    with get_sync_ctx(compiled, True):
        seen["compiled_final"] = ddp.require_backward_grad_sync

    acc = Accelerator(cpu=True)
    prepared = acc.prepare(_model())
    acc.gradient_state._set_sync_gradients(False)  # what accelerator.accumulate() sets mid-window
    with get_sync_ctx(prepared, None, accelerator=acc):
        seen["acc_mid"] = prepared.require_backward_grad_sync
    acc.gradient_state._set_sync_gradients(True)
    with get_sync_ctx(prepared, None, accelerator=acc):
        seen["acc_final"] = prepared.require_backward_grad_sync

    class OwnWrapper(nn.Module):  # FSDP1 and any other wrapper with a callable no_sync
        def __init__(self) -> None:
            super().__init__()
            self.synced = True

        def no_sync(self):
            wrapper = self

            class _Ctx:
                def __enter__(self):
                    wrapper.synced = False

                def __exit__(self, *exc):
                    wrapper.synced = True

            return _Ctx()

    own = OwnWrapper()
    with get_sync_ctx(own, False):
        seen["own_inside"] = own.synced
    with get_sync_ctx(own, True):
        seen["own_final"] = own.synced

    plain = _model()
    seen["plain"] = type(get_sync_ctx(plain, False)).__name__

    parts = [DDP(_model()), DDP(_model())]
    try:
        with get_sync_ctx(parts, False):
            seen["parts_inside"] = [p.require_backward_grad_sync for p in parts]
            raise KeyError("boom")
    except KeyError:
        pass
    seen["parts_after"] = [p.require_backward_grad_sync for p in parts]
    return seen


@pytest.mark.stack
def test_ddp_wrappers_accelerator_and_parts() -> None:
    # a real DeepSpeed engine, raw and under an Accelerator: tests/test_deepspeed.py
    for seen in run_distributed(_ddp_wrappers, 2, timeout=90):
        assert seen["compiled_inside"] is False and seen["compiled_after"] is True
        assert seen["compiled_final"] is True
        assert seen["acc_mid"] is False and seen["acc_final"] is True
        assert seen["own_inside"] is False and seen["own_final"] is True
        assert seen["plain"] == "nullcontext"
        assert seen["parts_inside"] == [False, False] and seen["parts_after"] == [True, True]


def _group_spellings() -> dict:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    prepared = acc.prepare(_model())
    seen: dict = {}
    for synced in (False, True):  # what accelerator.accumulate() sets mid-window, then last
        acc.gradient_state._set_sync_gradients(synced)
        for name in ("group", "accelerator"):
            with get_sync_ctx(prepared, None, **{name: acc}):
                seen[f"{name}_{synced}"] = prepared.require_backward_grad_sync
    with get_sync_ctx(prepared, False, group=dist.group.WORLD):  # a ProcessGroup: the model decides
        seen["process_group"] = prepared.require_backward_grad_sync
    for name, kwargs in {"both": {"group": acc, "accelerator": acc},
                         "no_accelerator": {"group": dist.group.WORLD}}.items():
        try:
            get_sync_ctx(prepared, None, **kwargs)
            seen[name] = "no error"
        except TypeError as exc:
            seen[name] = str(exc)
    return seen


def test_group_and_accelerator_name_the_same_parameter() -> None:
    for seen in run_distributed(_group_spellings, 2, timeout=90):
        assert seen["group_False"] is seen["accelerator_False"] is False
        assert seen["group_True"] is seen["accelerator_True"] is True
        assert seen["process_group"] is False  # a DeepSpeed Accelerator: tests/test_deepspeed.py
        assert "both group= and accelerator=" in seen["both"], seen["both"]
        assert "group=accelerator" in seen["no_accelerator"], seen["no_accelerator"]


class NoSyncWrapper:
    """Not an nn.Module: a training wrapper that holds a DDP model and forwards ``no_sync``."""

    def __init__(self, ddp: nn.Module) -> None:
        self.ddp = ddp
        self.no_sync_calls = 0

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def parameters(self):
        return self.ddp.parameters()

    def no_sync(self):
        self.no_sync_calls += 1
        return self.ddp.no_sync()


def _duck_typed_wrapper() -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_model())
    calls: list[int] = []
    ddp.register_comm_hook(calls, _counting_hook)
    wrapper = NoSyncWrapper(ddp)
    out = _train(wrapper, ddp.module, dist.group.WORLD, 2, lambda last: get_sync_ctx(wrapper, last))
    out |= {"hook_calls_per_step": len(calls) / 2, "no_sync_calls": wrapper.no_sync_calls}
    with get_sync_ctx([wrapper, DDP(_model())], True):  # with modules in a list, final step
        out["final_in_list"] = ddp.require_backward_grad_sync
    try:
        get_sync_ctx(object(), False)
    except TypeError as exc:
        out["neither"] = str(exc)
    return out


def test_object_with_a_callable_no_sync_is_accepted() -> None:
    for rank in run_distributed(_duck_typed_wrapper, 2):
        assert rank["hook_calls_per_step"] == 1  # one gradient all-reduce per optimizer step
        assert rank["no_sync_calls"] == 2 * (K - 1)  # called for every non-final micro-batch
        assert all(rank["loss_ok"]) and max(rank["errors"]) < 1e-6  # exact vs. one process
        assert rank["final_in_list"] is True
        assert "nn.Module" in rank["neither"] and "no_sync" in rank["neither"]


def _static_graph_log() -> list[str]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Keep()
    logger = logging.getLogger("accel_utils.grad_sync")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ddp = DDP(_model(), static_graph=True)
        first = type(get_sync_ctx(ddp, False)).__name__
        get_sync_ctx(ddp, False)
        del ddp._static_graph_delay_allreduce_enqueued  # as on a torch without the private flag
        try:
            get_sync_ctx(ddp, False)
            error = ""
        except RuntimeError as exc:
            error = str(exc)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    return [first, error, *records]


def test_static_graph_syncs_until_recorded_logs_once_and_names_remedy() -> None:
    for first, error, *records in run_distributed(_static_graph_log, 2):
        assert first == "nullcontext"
        assert len([r for r in records if "static_graph" in r]) == 1
        assert "static_graph=False" in error and "187732" in error


# ----------------------------------------------------------------------------- FSDP2 / HSDP


def _count_collectives():
    """Wrap the collectives FSDP2 looks up at call time; returns (counts, restore)."""
    counts = {"reduce_scatter": 0, "all_reduce": 0}
    real_rs, real_ar = dist.reduce_scatter_single, dist.all_reduce

    def rs(*args, **kwargs):
        counts["reduce_scatter"] += 1
        return real_rs(*args, **kwargs)

    def ar(*args, **kwargs):
        counts["all_reduce"] += 1
        return real_ar(*args, **kwargs)

    dist.reduce_scatter_single, dist.all_reduce = rs, ar

    def restore() -> None:
        dist.reduce_scatter_single, dist.all_reduce = real_rs, real_ar

    return counts, restore


def fsdp_model(mesh_shape: tuple[int, ...]) -> tuple[TinyLM, object]:
    """The tiny model under FSDP2 (1-D mesh) or HSDP (2-D), and its mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("dp_replicate", "dp_shard") if len(mesh_shape) == 2 else ("dp_shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = _model()
    for unit in (model.embed, model.mid, model.head):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root holds no parameters of its own: 3 units
    return model, mesh


def _fsdp_run(mesh_shape: tuple[int, ...], defer) -> dict:
    model, mesh = fsdp_model(mesh_shape)
    counts, restore = _count_collectives()
    try:  # reduce_loss over the mesh: the loss is averaged over every data-parallel rank
        out = _train(model, model, mesh, 2, lambda last: get_sync_ctx(model, last, defer))
    finally:
        restore()
    return out | {"counts": counts}


def _fsdp_cases(mesh_shape: tuple[int, ...]) -> dict:
    return {str(defer): _fsdp_run(mesh_shape, defer) for defer in (True, False, "replicas")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size,mesh_shape", [(2, (2,)), (4, (2, 2))], ids=["fsdp2", "hsdp"])
def test_fsdp2_accumulation_equals_one_process_with_expected_collectives(
    world_size: int, mesh_shape: tuple[int, ...]
) -> None:
    out = run_distributed(_fsdp_cases, world_size, mesh_shape, timeout=100)
    units, steps = 3, 2
    hsdp = len(mesh_shape) == 2
    # per unit and optimizer step: (reduce-scatters, cross-replica all-reduces)
    expected = {"True": (1, 1), "False": (K, K), "replicas": (K, 1) if hsdp else (1, 1)}
    for rank in out:
        for defer, (rs, ar) in expected.items():
            case = rank[defer]
            assert all(case["loss_ok"]), defer
            assert max(case["errors"]) < 1e-6, defer
            # reduce_loss adds one all-reduce per step; without HSDP there is no cross-replica one
            want_ar = (units * ar if hsdp else 0) + 1
            assert case["counts"]["reduce_scatter"] == units * rs * steps, (defer, case["counts"])
            assert case["counts"]["all_reduce"] == want_ar * steps, (defer, case["counts"])


def _fsdp_restore_on_error() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from accel_utils.grad_sync import _fsdp2_flags, _fsdp_modules

    def flags(root: nn.Module) -> list[list[bool]]:
        return [list(_fsdp2_flags(sub)) for sub in _fsdp_modules(root)]

    mesh = init_device_mesh("cpu", (2,))
    first, second = _model(), _model()
    for root in (first, second):
        fully_shard(root.mid, mesh=mesh)
        fully_shard(root, mesh=mesh)
    second.set_requires_all_reduce(False)  # a prior state the caller chose: must come back
    before = [flags(m) for m in (first, second)]
    inside = None
    try:
        with get_sync_ctx([first, second], False, True):
            inside = [flags(m) for m in (first, second)]
            raise RuntimeError("a micro-batch failed")
    except RuntimeError:
        pass
    after = [flags(m) for m in (first, second)]
    return {"before": before, "inside": inside, "after": after}


def test_fsdp2_flags_restored_after_a_block_that_raised() -> None:
    for seen in run_distributed(_fsdp_restore_on_error, 2):
        assert seen["after"] == seen["before"]
        assert seen["before"][1] == [[True, False], [True, False]]
        assert all(flags == [False, False] for part in seen["inside"] for flags in part)


# ----------------------------------------------------------------------------- no group, bad input


def test_single_process_is_a_null_context() -> None:
    assert not dist.is_initialized()
    assert isinstance(get_sync_ctx(_model(), False), nullcontext)
    assert isinstance(get_sync_ctx([_model(), _model()], False, "replicas"), nullcontext)


@pytest.mark.parametrize(
    "args,kwargs,exc,words",
    [
        (("not a model", False), {}, TypeError, "nn.Module"),
        ((object(), False), {}, TypeError, "callable no_sync"),
        ((types.SimpleNamespace(no_sync=1), False), {}, TypeError, "callable no_sync"),
        (([], False), {}, ValueError, "empty"),
        ((nn.Linear(1, 1), 1), {}, TypeError, "bool"),
        ((nn.Linear(1, 1), None), {}, TypeError, "accelerator"),
        ((nn.Linear(1, 1), False, "always"), {}, ValueError, "'replicas'"),
        ((nn.Linear(1, 1), False, 1), {}, ValueError, "True, False"),
    ],
)
def test_bad_input_says_what_was_expected(args, kwargs, exc, words) -> None:
    with pytest.raises(exc, match=words):
        get_sync_ctx(*args, **kwargs)


@pytest.mark.parametrize("optim_step", [None, True, False])
def test_get_sync_ctx_names_what_accelerator_accepts(optim_step) -> None:
    # was AttributeError: 'object' object has no attribute 'sync_gradients' (or, with a bool
    # is_optim_step, no error at all)
    with pytest.raises(TypeError, match=r"accelerate\.Accelerator"):
        get_sync_ctx(torch.nn.Linear(1, 1), optim_step, accelerator=object())
