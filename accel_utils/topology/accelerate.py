"""What an Accelerate object says: its state, its layout's name, its DeepSpeed and sync flags.

Part of the resolver: with :mod:`accel_utils.topology.resolver`, the one place that reads
Accelerate's state objects (and the Trainer's ``TrainingArguments``, which carry one).
accelerate and transformers are only looked up in ``sys.modules``: their objects exist only once
the caller imported them, and importing them here would cost seconds.
"""

from __future__ import annotations

import sys
from typing import Any


def accelerate_state(handle: Any) -> Any:
    """The Accelerate state behind ``handle`` (an Accelerator, a PartialState, an
    AcceleratorState, a ``transformers.TrainingArguments``); None for anything else.

    Accelerate is only consulted when the caller already imported it.
    """
    accelerate = sys.modules.get("accelerate")
    if accelerate is None or handle is None:
        return None
    if isinstance(handle, accelerate.Accelerator):
        return handle.state
    if isinstance(handle, accelerate.PartialState):
        return handle
    if type(handle).__name__ == "AcceleratorState" and hasattr(handle, "num_processes"):
        return handle
    return training_arguments_state(handle)  # None unless a transformers.TrainingArguments


def is_deepspeed_run(accelerator: Any) -> bool:
    """The Accelerator (or a stand-in with ``distributed_type``) runs DeepSpeed."""
    # DistributedType is a str enum: equal to its value, though str() of it is not
    return accelerator is not None and getattr(accelerator, "distributed_type", None) == "DEEPSPEED"


def check_accelerator(accelerator: Any) -> None:
    """Refuse an ``accelerator=`` argument that is neither None nor Accelerator-like.

    Accepted: an ``accelerate.Accelerator``, or a stand-in with its ``sync_gradients`` flag (and,
    for a DeepSpeed run, ``distributed_type``). Checked up front, so that a wrong object says
    what was expected instead of failing on a missing attribute later, or not at all.

    Raises:
        TypeError: anything else (a PartialState has no ``sync_gradients``: pass the Accelerator).
    """
    if accelerator is None or hasattr(accelerator, "sync_gradients"):
        return
    raise TypeError(
        "accelerator must be an accelerate.Accelerator (or an object with its sync_gradients "
        f"attribute) or None; got {type(accelerator).__name__}"
    )


def sync_gradients(accelerator: Any) -> bool:
    """Whether the Accelerator's current micro-batch is the one the optimizer steps after."""
    return bool(accelerator.sync_gradients)


def accelerate_layout_name(state: Any) -> str:
    """The layout an Accelerate state runs, as a name: ``ddp``, ``fsdp``, ``fsdp2``, ``hsdp``,
    ``deepspeed_zero0`` .. ``deepspeed_zero3``, or the ``DistributedType`` value (``NO``,
    ``MULTI_CPU``, ``MEGATRON_LM``, ...)."""
    kind = str(getattr(state.distributed_type, "value", state.distributed_type))
    if kind == "DEEPSPEED":
        return f"deepspeed_zero{state.deepspeed_plugin.zero_stage}"
    if kind == "FSDP":
        plugin = state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 2:
            return "fsdp2"  # HSDP shows in the device mesh
        strategy = str(getattr(plugin, "sharding_strategy", "FULL_SHARD")).upper()
        return "ddp" if "NO_SHARD" in strategy else "hsdp" if "HYBRID" in strategy else "fsdp"
    return kind


def training_arguments_state(handle: Any) -> Any:
    """The Accelerate state behind a ``transformers.TrainingArguments``; None for anything else.

    Once the Trainer's ``Accelerator`` exists, its ``AcceleratorState`` (the device mesh, the
    FSDP / DeepSpeed plugin); before that the ``PartialState`` the arguments set up when they
    were created (``args.distributed_state``, what ``args.main_process_first`` uses). transformers
    and accelerate are only looked up in ``sys.modules``: arguments exist only once they are.
    """
    training_args = sys.modules.get("transformers.training_args")
    if training_args is None or not isinstance(handle, training_args.TrainingArguments):
        return None
    state = sys.modules.get("accelerate.state")
    if state is not None and state.is_initialized():
        return state.AcceleratorState()  # a view of the shared state, as accelerate's own helpers
    return getattr(handle, "distributed_state", None)
