"""Gradient-sync contexts for gradient accumulation: skip the gradient reduction until the last
micro-batch, for DDP, FSDP2 (HSDP included), FSDP1 and lists of model parts."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accel_utils._group_arg import group_or_alias
from accel_utils._models import is_deepspeed_engine, is_fsdp2, is_hsdp, unwrap_compiled
from accel_utils.topology import resolve
from accel_utils.topology.accelerate import check_accelerator, is_deepspeed_run, sync_gradients

logger = logging.getLogger(__name__)

DeferMode = bool | Literal["replicas"]

# Static-graph DDP models already told that they sync until their graph is recorded.
_static_graph_logged: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def get_sync_ctx(
    model: Any,
    is_optim_step: bool | None,
    defer_fsdp_grad_sync: DeferMode = True,
    *,
    group: Any = None,
    accelerator: Any = None,
) -> AbstractContextManager[None]:
    """The context to run one micro-batch's forward **and** backward in.

    Wrap the forward as well as the backward: DDP decides at forward time whether the next
    backward reduces gradients, so a forward outside the context still syncs.

    By model type:

    * DDP (also as returned by ``Accelerator.prepare`` or wrapped by ``torch.compile``):
      ``no_sync()`` on non-final micro-batches, a null context on the final one. With
      ``static_graph=True`` it syncs until the static graph has been recorded by one synced
      backward (torch crashes on ``no_sync`` before that, pytorch#187732); accumulating with an
      extra all-reduce is still exact.
    * FSDP2 (``torch.distributed.fsdp.FSDPModule``): sets the module's gradient-sync flags on
      entry through its public setters and restores their previous values on exit, also when
      the block raises. When the block raises (say, an out-of-memory error caught to skip the
      batch), the context also discards everything FSDP2 holds for the current accumulation
      window: the failed micro-batch's gradient **and** those of the earlier micro-batches of
      the same optimizer step that were not yet reduced (with deferred sync they exist only in
      FSDP2's unsharded buffers, which ``zero_grad()`` cannot reach). Call
      ``optimizer.zero_grad()`` and restart the step's micro-batches: the next step is then
      exact. No collective runs on that path, so a rank that failed alone cannot hang there.
    * FSDP1 and any other wrapper with a callable ``no_sync``: ``no_sync()`` on non-final
      micro-batches. The wrapper need not be an ``nn.Module``: any object with a callable
      ``no_sync`` (a training-framework wrapper that holds the DDP model) is accepted, and its
      ``no_sync()`` is called (the wrapper may do more than its inner DDP's ``no_sync``); a
      null context on the final micro-batch.
    * DeepSpeed engines (and any run whose ``group`` is a DeepSpeed Accelerator), plain modules
      and single-process runs: a null context (DeepSpeed accumulates by itself).

    Args:
        model: the model (an ``nn.Module``, or any object with a callable ``no_sync``), or a
            list / tuple of them (pipeline stages, several FSDP roots): the context applies to,
            and restores, every part.
        is_optim_step: True on the micro-batch after which the optimizer steps. ``None`` asks
            the Accelerator passed as ``group`` (its ``sync_gradients``).
        defer_fsdp_grad_sync: what FSDP2 does on non-final micro-batches.

            * ``True`` (default): no reduce-scatter and, on HSDP, no all-reduce: the least
              communication, but every rank keeps unsharded gradients until the optimizer step
              (peak memory grows by the unsharded gradient size).
            * ``False``: reduce-scatter (and all-reduce) on every micro-batch: gradients stay
              sharded (lowest memory), with K times the communication.
            * ``"replicas"``: on HSDP (a 2-D replicate x shard mesh) reduce-scatter inside each
              replica on every micro-batch, so gradients stay sharded, and defer only the
              all-reduce across replicas, usually the slow inter-node link, to the optimizer
              step. On a 1-D FSDP2 mesh and on DDP it behaves as ``True``.
        group: the run the model trains in, as everywhere in accel-utils: anything
            :func:`accel_utils.resolve` accepts, None for the default group. The model's own
            wrapper says which collectives to skip; an ``accelerate.Accelerator`` here also
            supplies ``is_optim_step`` when it is None, and leaves a DeepSpeed run to DeepSpeed.
        accelerator: the same as ``group``, kept so that existing calls keep working; pass one
            of the two.

    Returns:
        A context manager.

    Raises:
        TypeError: ``model`` (or a part) is neither an ``nn.Module`` nor an object with a
            callable ``no_sync``, ``is_optim_step`` is neither a bool nor None (or None without
            an Accelerator to ask), both ``group`` and ``accelerator`` were passed, or
            ``accelerator`` is neither None nor an ``accelerate.Accelerator`` (nor an object with
            its ``sync_gradients`` attribute).
        ValueError: an unknown ``defer_fsdp_grad_sync``, or an empty list of parts.
        RuntimeError: a static-graph DDP model whose graph state cannot be read on this torch.

    Example:
        >>> for i, batch in enumerate(micro_batches):
        ...     with get_sync_ctx(model, is_optim_step=i == len(micro_batches) - 1):
        ...         model(**batch).loss.backward()
    """
    if not (defer_fsdp_grad_sync is True or defer_fsdp_grad_sync is False
            or defer_fsdp_grad_sync == "replicas"):
        raise ValueError(
            f"defer_fsdp_grad_sync must be True, False or 'replicas'; got {defer_fsdp_grad_sync!r}"
        )
    check_accelerator(accelerator)
    run = group_or_alias(group, accelerator, alias_name="accelerator", function="get_sync_ctx")
    if is_optim_step is None:
        if not hasattr(run, "sync_gradients"):
            raise TypeError(
                "is_optim_step=None needs group=accelerator (an accelerate.Accelerator, whose "
                "sync_gradients it then means)"
            )
        is_optim_step = sync_gradients(run)
    if not isinstance(is_optim_step, bool):
        raise TypeError(f"is_optim_step must be a bool (or None); got {is_optim_step!r}")
    parts = tuple(model) if isinstance(model, (list, tuple)) else (model,)
    if not parts:
        raise ValueError("model is an empty list: pass the model or its parts")
    for part in parts:
        if not isinstance(part, nn.Module) and not callable(getattr(part, "no_sync", None)):
            raise TypeError(
                "model must be a torch.nn.Module, an object with a callable no_sync() (a "
                f"wrapper), or a list of them; got {type(part).__name__}"
            )
    if is_deepspeed_run(run):
        return nullcontext()
    if not resolve().distributed_enabled:
        return nullcontext()
    if len(parts) == 1:
        return _part_ctx(parts[0], is_optim_step, defer_fsdp_grad_sync)
    return _all_parts(parts, is_optim_step, defer_fsdp_grad_sync)


@contextmanager
def _all_parts(
    parts: tuple[Any, ...], is_optim_step: bool, defer: DeferMode
) -> Iterator[None]:
    with ExitStack() as stack:  # exits (restores) every part entered, in reverse, also on error
        for part in parts:
            stack.enter_context(_part_ctx(part, is_optim_step, defer))
        yield


def _part_ctx(
    part: Any, is_optim_step: bool, defer: DeferMode
) -> AbstractContextManager[None]:
    module = unwrap_compiled(part)
    if is_deepspeed_engine(module):
        return nullcontext()
    if is_fsdp2(module):
        return _fsdp2_ctx(module, is_optim_step, defer)
    if is_optim_step:
        return nullcontext()
    if isinstance(module, DistributedDataParallel):
        return _ddp_no_sync(module)
    no_sync = getattr(module, "no_sync", None)
    return no_sync() if callable(no_sync) else nullcontext()


def _ddp_no_sync(ddp: DistributedDataParallel) -> AbstractContextManager[None]:
    if ddp.static_graph and not _static_graph_recorded(ddp):
        if ddp not in _static_graph_logged:
            _static_graph_logged.add(ddp)
            logger.info(
                "DDP static_graph=True: gradients are all-reduced on every micro-batch until one "
                "synced backward has recorded the static graph (no_sync before that crashes in "
                "torch); accumulation stays exact"
            )
        return nullcontext()
    return ddp.no_sync()


def _static_graph_recorded(ddp: DistributedDataParallel) -> bool:
    # Set by DDP's first synced backward (read on torch 2.13); a private flag, hence the guard.
    recorded = getattr(ddp, "_static_graph_delay_allreduce_enqueued", None)
    if not isinstance(recorded, bool):
        raise RuntimeError(
            f"get_sync_ctx cannot tell whether this static-graph DDP model has recorded its graph "
            f"(torch {torch.__version__} lacks DDP._static_graph_delay_allreduce_enqueued), and "
            "no_sync before that crashes or silently skips all-reduces (pytorch#187732). Build "
            "the DDP model with static_graph=False for gradient accumulation, or pass "
            "is_optim_step=True on every micro-batch."
        )
    return recorded


@contextmanager
def _fsdp2_ctx(module: Any, is_optim_step: bool, defer: DeferMode) -> Iterator[None]:
    saved = [(sub, *_fsdp2_flags(sub)) for sub in _fsdp_modules(module)]
    try:
        if defer == "replicas" and is_hsdp(module):
            module.set_requires_gradient_sync(True)
            module.set_requires_all_reduce(is_optim_step)
        else:
            module.set_requires_gradient_sync(is_optim_step or not defer)
        yield
    except BaseException:
        _discard_iteration(module)
        raise
    finally:  # through the public setters, per FSDP module (recurse=False)
        for sub, reduce_grads, all_reduce_grads in saved:
            sub.set_requires_gradient_sync(reduce_grads, recurse=False)
            sub.set_requires_all_reduce(all_reduce_grads, recurse=False)


def _fsdp_modules(module: nn.Module) -> list[Any]:
    return [sub for sub in module.modules() if is_fsdp2(sub)]


def _param_groups(sub: Any) -> list[Any]:
    """The FSDP parameter groups of one FSDP module (private state, hence the guard).

    FSDP2 has setters for its gradient-sync flags but no getters, nor a way to drop the unsharded
    gradients it accumulates while sync is off; both need these groups.
    """
    state = getattr(sub, "_get_fsdp_state", None)
    state = state() if callable(state) else None
    groups = getattr(state, "_fsdp_param_groups", None)  # torch 2.13: a list
    if groups is None and state is not None and hasattr(state, "_fsdp_param_group"):
        groups = [g for g in (state._fsdp_param_group,) if g is not None]  # older: one or None
    if groups is None:
        raise RuntimeError(
            f"get_sync_ctx cannot read the gradient-sync state of FSDP2 modules on torch "
            f"{torch.__version__} (FSDPModule._get_fsdp_state()._fsdp_param_groups is gone), so "
            "it could neither restore the flags you had set nor discard the gradients of a "
            "micro-batch that raised. Call model.set_requires_gradient_sync(is_optim_step) "
            "yourself, or use a torch version accel-utils supports (2.11 to 2.13)."
        )
    return list(groups)


def _fsdp2_flags(sub: Any) -> tuple[bool, bool]:
    """``sub``'s (reduce-scatter, all-reduce) flags: what its public setters last wrote."""
    groups = _param_groups(sub)
    if not groups:  # a module without parameters of its own: FSDP2's defaults
        return True, True
    return bool(groups[0].reduce_grads), bool(groups[0].all_reduce_grads)


def _discard_iteration(module: Any) -> None:
    """After a micro-batch raised: drop what FSDP2 holds for the accumulation window.

    ``reset_iter_state()`` (public, torch >= 2.13, root modules only) resets the forward /
    backward state and HSDP's deferred partial reductions. It leaves the unsharded gradients
    accumulated while sync was off, which ``zero_grad()`` cannot reach (they live on the
    unsharded parameters) and the next synced backward would add to the step: clear them too.
    No collective runs here, so a rank that failed alone cannot hang.
    """
    reset = getattr(module, "reset_iter_state", None)
    if not callable(reset):
        logger.warning(
            "torch %s lacks FSDPModule.reset_iter_state (torch >= 2.13): after a micro-batch "
            "that raised, FSDP2's iteration state is not reset and the next step may be wrong; "
            "upgrade torch, or restart from a checkpoint", torch.__version__,
        )
    else:
        try:
            reset()
        except AttributeError:  # torch 2.13 before the first forward: nothing to reset yet
            pass
        except RuntimeError as exc:  # not the root FSDP module: the root's state stays
            logger.warning(
                "FSDP2 iteration state not reset after a micro-batch raised (%s): pass "
                "get_sync_ctx the root FSDP module (the one fully_shard was applied to last)", exc,
            )
    for sub in _fsdp_modules(module):
        for group in _param_groups(sub):
            for param in group.fsdp_params:
                param.unsharded_accumulated_grad = None  # reduce_dtype accumulation
                unsharded = getattr(param, "_unsharded_param", None)  # absent until first unshard
                if unsharded is not None:
                    unsharded.grad = None
