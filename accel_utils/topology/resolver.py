"""The resolver: whatever the caller passes (or nothing) -> one frozen :class:`Topology`.

Every feature of accel-utils asks :func:`resolve` instead of deriving ranks, nodes or groups
itself. Answers are cached per handle (and node layouts per group) for one default group: a new
``init_process_group`` starts the caches afresh.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from accel_utils._identity_cache import IdentityCache
from accel_utils._side.timing import DEFAULT_LIVENESS
from accel_utils.topology import launcher
from accel_utils.topology.accelerate import accelerate_state
from accel_utils.topology.launcher import LAUNCHER_VARIABLES
from accel_utils.topology.mesh import forget_groups, mesh_groups
from accel_utils.topology.nodes import (
    NodeLayout,
    layout_from_gather,
    layout_from_launcher,
    log_changed_variables,
)

logger = logging.getLogger(__name__)

# The node gather happens at start-up, where every rank arrives within seconds of the others: a
# rank that reads Topology.nodes alone learns it in minutes, not after a 10-hour guard timeout.
NODES_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Topology:
    """The parallel layout seen by one process, for one group.

    Ranks are relative to ``group``. Two data-parallel views:

    * ``loss_*``: the group losses and token counts are summed over: data-parallel ranks times
      context-parallel ranks (Accelerate's ``dp_cp``; never ``tp``), since under context
      parallelism every cp rank holds a part of each sequence.
    * ``dp_*``: the data-parallel ranks alone, which see different samples (eval samples are
      sharded over them, never across cp ranks that run one sequence together).

    ``replicate_*`` / ``shard_*`` split the data-parallel ranks into full model replicas and the
    shards inside one replica (HSDP). Without a mesh every data-parallel rank is presumed to
    hold a full replica, and the loss group is the data-parallel group.
    """

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: dist.ProcessGroup | None = None
    loss_rank: int = 0
    loss_size: int = 1
    loss_group: dist.ProcessGroup | None = None
    replicate_rank: int = 0
    replicate_size: int = 1
    shard_rank: int = 0
    shard_size: int = 1
    tp_size: int = 1
    cp_size: int = 1
    mesh: Any = None

    @property
    def distributed_enabled(self) -> bool:
        """More than one process in ``group``."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of ``group``."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """The backend of ``group`` (None without one)."""
        return None if self.group is None else str(dist.get_backend(self.group))

    @property
    def nodes(self) -> NodeLayout:
        """Node identity of this process within ``group``; computed on first use, then cached.

        From the launcher's variables where they describe the whole layout of ``group``
        (torchrun, accelerate launch: no collective); else from one gather of every member's
        launcher variables (as they were at ``import accel_utils``) and node key (host name
        and address toward the rendezvous): variables consistent with the group win, the node
        keys decide otherwise. See :func:`node_layout`.

        The gather is collective: read it on every member of ``group`` (accel-utils' guards,
        barriers and probes do, with their own timeouts). Read on some members only, it raises
        :class:`~accel_utils.BarrierTimeoutError` naming the others after 5 minutes.
        """
        return node_layout(self.group)


def single_process() -> Topology:
    """The layout of a process that is not part of any initialised process group."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return Topology(device=device)


def launcher_env() -> dict[str, str]:
    """The launcher variables as the launcher set them (only those that are set).

    Read once, at ``import accel_utils`` (see :mod:`accel_utils.topology.launcher`): values that an
    Accelerate object wrote into ``os.environ`` afterwards are not the launcher's.
    """
    snap = launcher.snapshot()
    return {name: snap[name] for name in LAUNCHER_VARIABLES if name in snap}


# Caches are only valid for one default group: a new init_process_group starts them afresh.
_world_seen: list[Any] = [None]
_world_lock = threading.Lock()
_topologies = IdentityCache()
_layouts = IdentityCache()
_layout_locks = IdentityCache()


def forget_world() -> None:
    """Start the caches afresh if the default group changed since they were filled."""
    world = dist.group.WORLD if dist.is_initialized() else None
    with _world_lock:  # once per world: a second thread's clear would drop the first's entries
        if world is not _world_seen[0]:
            _world_seen[0] = world
            _topologies.clear()
            _layouts.clear()
            forget_groups()


def resolve(handle: Any = None) -> Topology:
    """Turn whatever the caller passes into a :class:`Topology`.

    Args:
        handle: ``None`` (the default group), an ``accelerate.Accelerator`` or
            ``accelerate.PartialState``, a ``transformers.TrainingArguments`` (its Accelerate
            state), a ``torch.distributed.ProcessGroup`` or a ``DeviceMesh``.

    Resolving makes no collective, with one exception: a mesh (or an Accelerate state with
    one) whose loss group spans several dimensions (dp x cp) gets that group made once, with
    ``dist.new_group(use_local_synchronization=True)``: collective over the ranks of that group,
    which must all resolve it (every accel-utils function that reduces over it does), waiting
    at most the default group's timeout and then raising torch's error.

    Returns:
        The layout for ``handle``; rank 0 of 1 when no process group is initialised.

    Raises:
        TypeError: ``handle`` is none of the accepted kinds.
        ValueError: this process is not a member of the given group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return single_process()
    forget_world()
    key_obj = handle if handle is not None else dist.group.WORLD
    state = accelerate_state(handle)
    mesh_key = getattr(state, "device_mesh", None) if state is not None else None
    hit: Topology | None = _topologies.get(key_obj)
    if hit is not None and (state is None or hit.mesh is mesh_key):
        return hit
    topo = _resolve_uncached(handle, state)
    _topologies.put(key_obj, topo)
    return topo


def _resolve_uncached(handle: Any, state: Any) -> Topology:
    if state is not None:
        return _from_accelerate(state)
    if handle is None:
        return _from_group(_world_group())
    if handle is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group() returns to non-members
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group; "
            "call it only on the group's members"
        )
    if isinstance(handle, dist.ProcessGroup):
        return _from_group(handle)
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(handle, DeviceMesh):
        return _from_mesh(handle)
    raise TypeError(
        "expected None, an accelerate.Accelerator, an accelerate.PartialState, a "
        "transformers.TrainingArguments, a torch.distributed.ProcessGroup or a DeviceMesh; "
        f"got {type(handle).__name__}"
    )


def _world_group() -> dist.ProcessGroup:
    world = dist.group.WORLD
    if world is None:  # callers checked dist.is_initialized()
        raise RuntimeError("torch.distributed has no default process group")
    return world


def _group_device(group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _from_group(group: dist.ProcessGroup, device: torch.device | None = None) -> Topology:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group "
            f"(ranks {dist.get_process_group_ranks(group)}); call it only on the group's members"
        )
    size = dist.get_world_size(group)
    return Topology(
        rank=rank,
        world_size=size,
        group=group,
        device=device if device is not None else _group_device(group),
        dp_rank=rank,
        dp_size=size,
        dp_group=group,
        loss_rank=rank,
        loss_size=size,
        loss_group=group,
        replicate_rank=rank,
        replicate_size=size,
    )


def _from_mesh(mesh: Any, device: torch.device | None = None) -> Topology:
    device = device if device is not None else torch.device(mesh.device_type)
    if device == torch.device("cuda") and torch.cuda.is_available():  # no index: the current one
        device = torch.device("cuda", torch.cuda.current_device())
    groups = mesh_groups(mesh)
    return Topology(
        rank=dist.get_rank(groups.whole),
        world_size=dist.get_world_size(groups.whole),
        group=groups.whole,
        device=device,
        dp_rank=_rank_in(groups.data),
        dp_size=_size_of(groups.data),
        dp_group=groups.data,
        loss_rank=_rank_in(groups.loss),
        loss_size=_size_of(groups.loss),
        loss_group=groups.loss,
        # without replicate / shard dims, every data-parallel rank holds a replica
        replicate_rank=_rank_in(groups.replicate if groups.shard else groups.data),
        replicate_size=_size_of(groups.replicate if groups.shard else groups.data),
        shard_rank=_rank_in(groups.shard),
        shard_size=_size_of(groups.shard),
        tp_size=_size_of(groups.tp),
        cp_size=_size_of(groups.cp),
        mesh=mesh,
    )


def _rank_in(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _size_of(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _from_accelerate(state: Any) -> Topology:
    """The layout of an Accelerate state; where its process count disagrees with torch's, the
    parts that are torch's own: its device mesh (real torch groups) if it has one, else the
    default group, never a layout that sums losses over tp ranks because a count was wrong."""
    world = dist.get_world_size()
    claimed = getattr(state, "num_processes", world)
    mesh = getattr(state, "device_mesh", None)
    if claimed != world:
        # cpu=True turns DeepSpeed off; a DeepSpeed run without GPUs needs its backend named
        fix = ('pass kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] to the DeepSpeed '
               "Accelerator" if str(getattr(state, "distributed_type", "")).endswith("DEEPSPEED")
               else "create the Accelerator / PartialState with cpu=True (or launch with "
               "`accelerate launch --cpu` semantics)")
        logger.warning(
            "Accelerate's state reports %d process(es) but torch.distributed has %d; trusting "
            "torch.distributed%s. On a CPU machine %s so that they agree.",
            claimed,
            world,
            "" if mesh is None else " and the state's device mesh (its groups are torch's)",
            fix,
        )
        # the state's device belongs to the wrong count too: the mesh's (or the group's) device
        return _from_group(_world_group()) if mesh is None else _from_mesh(mesh)
    device = getattr(state, "device", None)
    if device is not None and device.type == "cpu":
        device = torch.device("cpu")  # Accelerate says "cpu:0"; CPU tensors have no index
    if mesh is not None:
        return _from_mesh(mesh, device)
    return _from_group(_world_group(), device)


def node_layout(group: dist.ProcessGroup | None, timeout: timedelta = NODES_TIMEOUT,
                liveness: float | None = DEFAULT_LIVENESS) -> NodeLayout:
    """Node identity of this process within ``group`` (see :attr:`Topology.nodes`).

    Where the launcher described the whole layout (torchrun, accelerate launch: see
    :func:`~accel_utils.topology.nodes.layout_from_launcher`): from its variables, without a
    collective. Otherwise every member contributes its launcher claims and its node key (host
    name and address toward the rendezvous) to one gather on the side channel, bounded by
    ``timeout`` and judged with ``liveness`` like a barrier, and every member decides from the
    same list (:func:`accel_utils.topology.nodes.decide`): claims that are consistent with the
    group win, else the node keys. Once per group; cached.
    """
    if group is None or not dist.is_initialized():
        return NodeLayout()
    forget_world()
    hit: NodeLayout | None = _layouts.get(group)
    if hit is not None:
        return hit
    # threads asking at once: one gather, not one each (theirs could pair crosswise between
    # ranks); a lock per group, since a gather waits for the other ranks, whose threads may
    # be gathering on another group first
    with _layout_locks.setdefault(group, threading.Lock):
        hit = _layouts.get(group)
        if hit is None:
            log_changed_variables()
            hit = layout_from_launcher(group) or layout_from_gather(group, timeout, liveness)
            _layouts.put(group, hit)
    return hit
