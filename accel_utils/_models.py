"""What a model object is: DDP, FSDP2 (and HSDP), a DeepSpeed engine, compiled; its DTensors.

The one reader of a model's wrappers and DTensor placements; :mod:`accel_utils.grad_sync` and
:mod:`accel_utils.eval_shard` ask here. (What an Accelerate object says is read by
:mod:`accel_utils.topology.accelerate`.)

Unwrapping is torch.compile's ``_orig_mod`` only: ``accelerate.utils.extract_model_from_parallel``
would also strip the DDP / FSDP1 / DeepSpeed wrappers that the callers need to see, and importing
accelerate costs about a second where the caller did not.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """``model`` without its ``torch.compile`` wrappers (``OptimizedModule._orig_mod``)."""
    inner = getattr(model, "_orig_mod", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "_orig_mod", None)
    return model


def is_deepspeed_engine(model: nn.Module) -> bool:
    """A DeepSpeed engine (by class name: deepspeed is never imported here)."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def deepspeed_stage(model: nn.Module) -> int | None:
    """The ZeRO stage of a DeepSpeed engine; None for any other module."""
    if not is_deepspeed_engine(model):
        return None
    stage: Any = model.zero_optimization_stage  # an engine method nn.Module's typing can't see
    return int(stage())


def is_fsdp2(model: nn.Module) -> bool:
    """An FSDP2 module (``fully_shard``); none exists before its module is imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_hsdp(model: nn.Module) -> bool:
    """FSDP2 lays HSDP parameters out as ``(Replicate(), Shard(0), ...)`` on a 2-D+ mesh."""
    layout = dtensor_layout(model)
    return layout is not None and layout[0].ndim >= 2 and 0 in layout[1]


def dtensor_layout(model: nn.Module) -> tuple[Any, set[int]] | None:
    """The device mesh of the model's DTensor parameters and the dims all of them replicate.

    None when no parameter is a DTensor. Where parameters live on different meshes (TP on a
    sub-mesh beside FSDP), the mesh of the most dimensions, and no replicated dim.
    """
    tensor_module = sys.modules.get("torch.distributed.tensor")
    if tensor_module is None:  # no DTensor can exist before its module is imported
        return None
    found = [
        (p.device_mesh, p.placements)
        for p in model.parameters()
        if isinstance(p, tensor_module.DTensor)
    ]
    if not found:
        return None
    mesh = found[0][0]
    if any(other != mesh for other, _ in found):
        return max((m for m, _ in found), key=lambda m: m.ndim), set()
    return mesh, {d for d in range(mesh.ndim) if all(pl[d].is_replicate() for _, pl in found)}
