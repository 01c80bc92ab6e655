"""Which node each member of a group runs on: from the launcher's variables, or one gather.

The sources of :func:`accel_utils.topology.node_layout`, which caches their answer per group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from accel_utils import _launcher, _nodes

# node identity is part of the resolver's story: its records keep the documented logger
logger = logging.getLogger("accel_utils.topology")


@dataclass(frozen=True)
class NodeLayout:
    """Which node each member of a group runs on.

    Attributes:
        node_rank: index of this process's node among the group's nodes.
        num_nodes: number of distinct nodes in the group.
        local_rank: this process's index among the group members on its node.
        local_world_size: number of group members on this process's node.
    """

    node_rank: int = 0
    num_nodes: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def log_changed_variables() -> None:
    changed = _launcher.changed_since_import()
    if changed:
        logger.debug(
            "launcher variables changed after accel_utils was imported (%s; Accelerate writes "
            "LOCAL_RANK / LOCAL_WORLD_SIZE under launches without torchrun): using the values "
            "from the launch",
            ", ".join(f"{name}: {then or 'unset'} -> {now or 'unset'}"
                      for name, (then, now) in changed.items()))


def layout_from_launcher(group: dist.ProcessGroup) -> NodeLayout | None:
    """The launcher's complete description of the default group, without a collective.

    Complete: LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (or NODE_RANK) and GROUP_WORLD_SIZE, as
    torchrun and accelerate launch set them, read at import and consistent with the group as
    far as one rank can tell (RANK and WORLD_SIZE are the group's, indices within their sizes).
    Anything less (NODE_RANK alone, as mpirun / srun recipes export it), or LOCAL_* read after
    Accelerate may have written them, is checked against every member in the gather instead.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if dist.get_world_size(group) != world or _launcher.accelerate_came_first():
        return None  # a subgroup's members must be gathered; Accelerate's LOCAL_* checked
    get = _launcher.get_int
    local_rank, local_size = get("LOCAL_RANK"), get("LOCAL_WORLD_SIZE")
    var = "GROUP_RANK" if get("GROUP_RANK") is not None else "NODE_RANK"
    node_rank, num_nodes = get(var), get("GROUP_WORLD_SIZE")
    if (local_rank is None or local_size is None or node_rank is None or num_nodes is None
            or get("RANK") != rank or get("WORLD_SIZE") != world
            or not 0 <= local_rank < local_size <= world
            or not 0 <= node_rank < num_nodes <= world):
        return None
    logger.debug("node identity of rank %d: from launcher variables (%s, GROUP_WORLD_SIZE, "
                 "LOCAL_RANK, LOCAL_WORLD_SIZE; complete, no gather): node %d of %d, local rank "
                 "%d of %d", rank, var, node_rank, num_nodes, local_rank, local_size)
    return NodeLayout(node_rank, num_nodes, local_rank, local_size)


def layout_from_gather(group: dist.ProcessGroup) -> NodeLayout:
    facts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(facts, _nodes.local_facts(), group=group)
    me = dist.get_rank(group)
    verdict = _nodes.decide(facts, whole_world=len(facts) == dist.get_world_size())
    node = verdict.node_of[me]
    layout = NodeLayout(
        node_rank=node,
        num_nodes=verdict.num_nodes,
        local_rank=verdict.local_of[me],
        local_world_size=verdict.node_of.count(node),
    )
    rejected = f"; launcher variables not used: {'; '.join(verdict.rejected)}" \
        if verdict.rejected else ""
    logger.debug("node identity of rank %d in a group of %d: from %s (node %d of %d, local rank "
                 "%d of %d)%s", me, len(facts), verdict.source, layout.node_rank,
                 layout.num_nodes, layout.local_rank, layout.local_world_size, rejected)
    if me == 0 and verdict.rejected:
        hint = (" (an Accelerator or PartialState built before accel_utils was imported writes "
                "LOCAL_RANK=0 / LOCAL_WORLD_SIZE=1 on launches without torchrun: import "
                "accel_utils first)" if any("LOCAL_" in r for r in verdict.rejected) else "")
        logger.warning("launcher variables set at import are inconsistent with the process "
                       "group and were not used (%s); node identity comes from %s%s",
                       "; ".join(verdict.rejected), verdict.source, hint)
    if me == 0 and verdict.collisions and verdict.by_keys:
        logger.warning(
            "%s: they count as different nodes, told apart by the address each uses to reach "
            "the rendezvous. Give every host its own host name, or export LOCAL_RANK, "
            "LOCAL_WORLD_SIZE and NODE_RANK on every process, so that node identity does not "
            "rest on addresses.", "; ".join(verdict.collisions))
    return layout
