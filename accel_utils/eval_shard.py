"""Which eval samples each rank scores, and how the per-rank results come back together.

:func:`dp_eval_sample_shard` answers "may this rank score its own subset?": only where a full
model replica runs ``generate()`` without collectives that pair it with other ranks. Under a
sharded model (FSDP, ZeRO-3, TP) every forward issues collectives that must stay in lockstep, so
every rank must score the same samples. :mod:`accel_utils.eval_samples` applies the answer
(``shard_samples``) and undoes it (``gather_sharded_results``).
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from typing import Any

import torch

from accel_utils._models import deepspeed_stage, dtensor_layout, unwrap_compiled
from accel_utils.eval_samples import Shard
from accel_utils.topology import Topology, resolve
from accel_utils.topology.accelerate import accelerate_layout_name, training_arguments_state
from accel_utils.topology.mesh import NON_DP_DIMS

logger = logging.getLogger(__name__)


class Placement(Enum):
    """How a data-parallel layout places the model on its ranks."""

    REPLICATED = "replicated"  # every rank holds it whole
    SHARDED = "sharded"  # it is split across the ranks
    HYBRID = "hybrid"  # it is split inside replicas (whose index the caller passes as dp_rank)


# Names (strings, DistributedType values, config class names), compared without "_", "-", case.
_MULTI_DEVICES = ("cpu", "gpu", "npu", "mlu", "sdaa", "musa", "xpu", "hpu", "neuron")
_KINDS = {
    **dict.fromkeys(("ddp", "deepspeedzero0", "deepspeedzero1", "deepspeedzero2"),
                    Placement.REPLICATED),
    **dict.fromkeys(("fsdp", "fsdp1", "fsdp2", "deepspeedzero3", "megatronfsdp", "tp"),
                    Placement.SHARDED),
    "hsdp": Placement.HYBRID,
    # accelerate.DistributedType values; DEEPSPEED alone does not say the ZeRO stage: lockstep
    **dict.fromkeys(("no", "xla", *(f"multi{d}" for d in _MULTI_DEVICES)), Placement.REPLICATED),
    **dict.fromkeys(("deepspeed", "megatronlm"), Placement.SHARDED),
}

_ACCEPTED = (
    "an accelerate.Accelerator, a transformers.TrainingArguments, an accelerate.ParallelismConfig, "
    "an accelerate.DistributedType, "
    "one of the strings 'ddp', 'fsdp', 'fsdp2', 'hsdp', 'deepspeed_zero0'..'deepspeed_zero3', "
    "'megatron_fsdp', 'tp', a torch DeviceMesh, a config object named after one of them "
    "(DDPConfig, FSDP2Config, MegatronFSDPConfig, ...), or the model itself (a torch.nn.Module)"
)


def dp_eval_sample_shard(
    distributed_config: Any, dp_rank: int | None = None, dp_size: int | None = None
) -> Shard | None:
    """Return ``(rank, size)`` to shard eval samples by, or None when every rank needs all of them.

    A full model replica per rank (DDP, DeepSpeed ZeRO-0/1/2) can score a disjoint subset:
    ``(dp_rank, dp_size)``. A sharded model (FSDP1 full/grad-op sharding, FSDP2, ZeRO-3,
    MegatronFSDP, pure TP) issues collectives inside ``generate()`` that must stay in lockstep
    across the group: None, every rank scores the same samples. HSDP and TP+DP with
    ``dp_replicate > 1``: ``(replicate_rank, replicate_size)``, so every full replica scores a
    disjoint subset while the ranks inside one replica get identical samples. The ranks of a
    replica still run collectives inside ``generate()`` together, so they must make the same
    number of decoding steps. ``synced_gpus=False`` (whose per-token all-reduce would span the
    whole world) is safe only for deterministic decoding (greedy, beam search), where they
    produce identical outputs; with sampling (``do_sample=True``) each rank draws its own
    tokens, stops after its own number of steps, and the replica's collectives hang. Then pass
    ``synced_gpus=True`` and have every rank call ``generate()`` equally often (the shorter
    shards repeat a batch whose results are dropped), as :class:`ShardedGenerationEvalMixin
    <accel_utils.integrations.trainer.ShardedGenerationEvalMixin>` does. One process (size 1)
    gives None.

    What ``dp_rank`` / ``dp_size`` mean with each form of ``distributed_config``:

    * an ``Accelerator``, a ``transformers.TrainingArguments`` (the Trainer's Accelerate state)
      or the model: optional; read from its topology (state, FSDP plugin, DeepSpeed stage,
      device mesh; DDP process group or DTensor placements) and, when given, checked against it
      (this rank's index and size of the data-parallel group).
    * a ``DeviceMesh``: optional, checked like the Accelerator's; the mesh's dimension names say
      the layout (``dp`` / ``dp_replicate`` replicas; ``dp_shard``, ``tp`` and ``cp`` ranks
      score the same samples in lockstep).
    * a ``ParallelismConfig`` (Accelerate 1.10+): this rank's index in the whole data-parallel
      group and its size (``dp_replicate x dp_shard``); the replicate coordinate follows
      Accelerate's mesh order (``dp_replicate`` outermost). Omitted, they come from the default
      group in that order.
    * ``"ddp"``, ``"deepspeed_zero0..2"``, a replicated ``DistributedType`` or config class:
      the data-parallel rank and size; omitted, those of the default group.
    * ``"hsdp"`` (which carries no mesh): the replicate rank and the number of replicas; required.
    * sharded names (``"fsdp"``, ``"fsdp2"``, ``"deepspeed_zero3"``, ``"megatron_fsdp"``,
      ``"tp"``, ``DistributedType.FSDP`` / ``DEEPSPEED`` / ``MEGATRON_LM``): validated, unused.

    Args:
        distributed_config: one of the forms above.
        dp_rank: see above.
        dp_size: see above.

    Returns:
        ``(rank, size)`` of this rank's sample shard, or None.

    Raises:
        ValueError: ``dp_size < 1``, ``dp_rank`` outside ``[0, dp_size)``, only one of them given
            where both are needed, or they disagree with the topology.
        TypeError: ``distributed_config`` is none of the accepted forms.
    """
    _validate(dp_rank, dp_size)
    if isinstance(distributed_config, torch.nn.Module):
        return _from_model(distributed_config, dp_rank, dp_size)
    accelerate = sys.modules.get("accelerate")
    if accelerate is not None:
        # ParallelismConfig arrived in Accelerate 1.10: an older release has none to be passed
        parallelism_config = getattr(accelerate, "ParallelismConfig", None)
        if parallelism_config is not None and isinstance(distributed_config, parallelism_config):
            return _from_parallelism_config(distributed_config, dp_rank, dp_size)
        is_accelerator = isinstance(distributed_config, accelerate.Accelerator)
        state = (distributed_config.state if is_accelerator
                 else training_arguments_state(distributed_config))
        if state is not None:
            topo = resolve(state)
            _check(topo, dp_rank, dp_size,
                   "the Accelerator" if is_accelerator else "the TrainingArguments")
            return _topology_shard(topo, _named_kind(accelerate_layout_name(state)))
    device_mesh = sys.modules.get("torch.distributed.device_mesh")
    if device_mesh is not None and isinstance(distributed_config, device_mesh.DeviceMesh):
        topo = resolve(distributed_config)
        _check(topo, dp_rank, dp_size, "the device mesh")
        # its dimension names say what is sharded
        return _topology_shard(topo, Placement.REPLICATED)
    kind = _named_kind(distributed_config)
    if kind is Placement.SHARDED:
        return None
    if kind is Placement.HYBRID and dp_rank is None:
        raise ValueError(
            "'hsdp' carries no mesh: pass dp_rank=<replicate rank> and dp_size=<number of "
            "replicas>, or pass the Accelerator, the device mesh's model or a ParallelismConfig"
        )
    if dp_rank is None or dp_size is None:  # _validate: both or neither
        topo = resolve()
        dp_rank, dp_size = topo.dp_rank, topo.dp_size
    return (dp_rank, dp_size) if dp_size > 1 else None


def _validate(dp_rank: Any, dp_size: Any) -> None:
    for name, value in (("dp_rank", dp_rank), ("dp_size", dp_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if (dp_rank is None) != (dp_size is None):
        raise ValueError(f"pass both dp_rank and dp_size or neither (got {dp_rank}, {dp_size})")
    if dp_size is not None and dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if dp_rank is not None and not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")


def _check(topo: Topology, dp_rank: int | None, dp_size: int | None, what: str) -> None:
    if dp_rank is not None and (dp_rank, dp_size) != (topo.dp_rank, topo.dp_size):
        raise ValueError(
            f"dp_rank={dp_rank}, dp_size={dp_size} disagree with {what}, whose data-parallel "
            f"rank and size are {topo.dp_rank}, {topo.dp_size}; omit them or pass those"
        )


def _named_kind(config: Any) -> Placement:
    name = config if isinstance(config, str) else None  # DistributedType is a str enum
    if name is None and not isinstance(config, (type, torch.nn.Module)):
        name = type(config).__name__
        name = name[: -len("config")] if name.lower().endswith("config") else None
    key = None if name is None else name.lower().replace("_", "").replace("-", "")
    if key not in _KINDS:
        raise TypeError(f"distributed_config: expected {_ACCEPTED}; got {config!r}")
    return _KINDS[key]


def _topology_shard(topo: Topology, kind: Placement) -> Shard | None:
    """The shard for a layout of ``kind`` on ``topo`` (a mesh's names override ``kind``)."""
    mesh = topo.mesh
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    model_parallel = mesh is not None and (
        topo.shard_size > 1 or topo.tp_size > 1 or bool(set(names) & set(NON_DP_DIMS))
    )
    if kind is Placement.REPLICATED and not model_parallel:
        return (topo.dp_rank, topo.dp_size) if topo.dp_size > 1 else None
    if mesh is not None and mesh.ndim > 1 and topo.replicate_size > 1:
        return topo.replicate_rank, topo.replicate_size
    if kind is Placement.HYBRID and mesh is None:  # FSDP1 hybrid sharding: shards inside a node
        nodes = topo.nodes
        return (nodes.node_rank, nodes.num_nodes) if nodes.num_nodes > 1 else None
    return None


def _from_parallelism_config(pc: Any, dp_rank: int | None, dp_size: int | None) -> Shard | None:
    replicate, shard = pc.dp_replicate_size, pc.dp_shard_size
    if dp_rank is None:
        topo = resolve()
        if topo.world_size != pc.total_size:
            raise ValueError(
                f"the ParallelismConfig describes {pc.total_size} processes but the default group "
                f"has {topo.world_size}; pass dp_rank and dp_size"
            )
        dp_rank, dp_size = topo.rank // pc.non_data_parallel_size, replicate * shard
    if dp_size != replicate * shard:
        raise ValueError(
            f"dp_size={dp_size} is not the ParallelismConfig's data-parallel size "
            f"dp_replicate_size x dp_shard_size = {replicate} x {shard}"
        )
    return (dp_rank // shard, replicate) if replicate > 1 else None


def _from_model(model: torch.nn.Module, dp_rank: int | None, dp_size: int | None) -> Shard | None:
    inner = unwrap_compiled(model)
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        topo = resolve(inner.process_group)
        _check(topo, dp_rank, dp_size, "the DDP model's process group")
        return _topology_shard(topo, Placement.REPLICATED)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(inner, fsdp.FullyShardedDataParallel):  # FSDP1
        topo = resolve(inner.process_group)
        _check(topo, dp_rank, dp_size, "the FSDP model's process group")
        no_shard = inner.sharding_strategy == fsdp.ShardingStrategy.NO_SHARD
        return _topology_shard(topo, Placement.REPLICATED) if no_shard else None
    stage = deepspeed_stage(inner)
    if stage is not None:
        topo = resolve()
        _check(topo, dp_rank, dp_size, "the default group")
        return None if stage == 3 else _topology_shard(topo, Placement.REPLICATED)
    layout = dtensor_layout(inner)
    if layout is None:  # plain tensors: a replica per rank of the default group
        topo = resolve()
        _check(topo, dp_rank, dp_size, "the default group (the model holds plain tensors)")
        return _topology_shard(topo, Placement.REPLICATED)
    mesh, replicated_dims = layout
    topo = resolve(mesh)
    _check(topo, dp_rank, dp_size, "the model's device mesh")
    if mesh.ndim == 1:  # FSDP2 and TP shard over it; replicate() keeps whole copies
        return _topology_shard(topo, Placement.REPLICATED if replicated_dims else Placement.SHARDED)
    names = tuple(mesh.mesh_dim_names or ())
    replicate_dim = next((i for i, name in enumerate(names) if "replicate" in name), 0)
    return _topology_shard(topo, Placement.SHARDED) if replicate_dim in replicated_dims else None
