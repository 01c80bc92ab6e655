"""Node identity: which node each member of a group runs on, and its place there.

Where the launcher described the whole layout (torchrun, accelerate launch), its variables say
it without a collective (:func:`layout_from_launcher`). Otherwise every member contributes one
:class:`NodeFacts` to one ``all_gather_object`` and every member runs :func:`decide` on the same
list, so every member reaches the same verdict without further messages
(:func:`layout_from_gather`). :func:`accel_utils.topology.resolver.node_layout` caches the answer
per group.

The facts are the launcher's claims (``GROUP_RANK`` / ``NODE_RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``GROUP_WORLD_SIZE`` as they were at ``import accel_utils``, see
:mod:`accel_utils.topology.launcher`) and a node key that needs no launcher: the host name and
the address this process uses to reach the rendezvous (``MASTER_ADDR``). Claims are used only
when they are consistent with the group; otherwise the node keys decide. Two hosts with the same
name (cloned images, containers) reach the rendezvous from different addresses, so they stay two
nodes; every process of one host uses the same address (loopback included), so they stay one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch.distributed as dist

from accel_utils.topology import launcher

# node identity is part of the resolver's story: its records keep the documented logger
logger = logging.getLogger("accel_utils.topology")

HOST_KEYS = "host names and addresses toward the rendezvous"


@dataclass(frozen=True)
class NodeFacts:
    """What one process knows about its node (gathered from every member of a group).

    Attributes:
        host: ``socket.gethostname()``.
        address: the local address of this process's route to the rendezvous (``MASTER_ADDR``),
            None where that is unknown.
        rank: ``RANK`` at import.
        world: ``WORLD_SIZE`` at import.
        node: ``GROUP_RANK`` at import, else ``NODE_RANK``.
        node_var: which of the two ``node`` came from.
        num_nodes: ``GROUP_WORLD_SIZE`` at import.
        local_rank: ``LOCAL_RANK`` at import.
        local_size: ``LOCAL_WORLD_SIZE`` at import.
    """

    host: str
    address: str | None = None
    rank: int | None = None
    world: int | None = None
    node: int | None = None
    node_var: str | None = None
    num_nodes: int | None = None
    local_rank: int | None = None
    local_size: int | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        """The node key that needs no launcher: host name and address."""
        return self.host, self.address

    def where(self) -> str:
        """The host for messages: ``name (address)``."""
        return self.host if self.address is None else f"{self.host} ({self.address})"


@dataclass(frozen=True)
class Verdict:
    """Every member's node, as every member of the group decides it.

    Attributes:
        node_of: the node index of each member (group rank order), 0..num_nodes-1.
        local_of: each member's index among the members on its node.
        num_nodes: number of nodes.
        source: what decided, for the log: ``launcher variables (...)`` or :data:`HOST_KEYS`.
        by_keys: the node keys (host name and address) decided the nodes.
        rejected: why launcher variables that were set were not used (empty if none).
        collisions: host names shared by hosts that the addresses tell apart.
    """

    node_of: tuple[int, ...]
    local_of: tuple[int, ...]
    num_nodes: int
    source: str
    by_keys: bool
    rejected: tuple[str, ...] = ()
    collisions: tuple[str, ...] = ()


def rendezvous_address() -> str | None:
    """The local address of this process's route to ``MASTER_ADDR`` (None if unknown).

    ``MASTER_ADDR`` is the same on every rank, so it may come from ``os.environ`` where the
    launch did not set it (a script that sets it before ``init_process_group``).
    """
    addr = launcher.get("MASTER_ADDR") or os.environ.get("MASTER_ADDR")
    if not addr:
        return None
    return _route_source(addr, launcher.get_int("MASTER_PORT") or 29500)


@functools.lru_cache(maxsize=8)
def _route_source(addr: str, port: int) -> str | None:
    # a UDP connect() picks the route and the source address without sending anything
    try:
        for family, kind, proto, _, target in socket.getaddrinfo(addr, port,
                                                                 type=socket.SOCK_DGRAM):
            with socket.socket(family, kind, proto) as sock:
                sock.connect(target)
                return str(sock.getsockname()[0])
    except OSError:
        return None
    return None


def local_facts() -> NodeFacts:
    """This process's :class:`NodeFacts` (launcher claims from the import-time snapshot)."""
    node_var = "GROUP_RANK" if launcher.get_int("GROUP_RANK") is not None else "NODE_RANK"
    return NodeFacts(
        host=socket.gethostname(),
        address=rendezvous_address(),
        rank=launcher.get_int("RANK"),
        world=launcher.get_int("WORLD_SIZE"),
        node=launcher.get_int(node_var),
        node_var=node_var if launcher.get_int(node_var) is not None else None,
        num_nodes=launcher.get_int("GROUP_WORLD_SIZE"),
        local_rank=launcher.get_int("LOCAL_RANK"),
        local_size=launcher.get_int("LOCAL_WORLD_SIZE"),
    )


def decide(facts: Sequence[NodeFacts], whole_world: bool) -> Verdict:
    """The node of every member, from every member's facts (a pure function).

    Args:
        facts: one entry per member of the group, in group rank order.
        whole_world: the group is the default group (the launcher's variables describe it);
            for a subgroup only node claims are used, renumbered over the subgroup's nodes.

    Returns:
        The verdict; launcher claims win where they are consistent with the group.
    """
    rejected: list[str] = []
    usable = not whole_world or _describes_world(facts, rejected)
    node_of = _nodes_from_claims(facts, whole_world, rejected) if usable else None
    by_keys = node_of is None
    if node_of is None:
        node_of = _numbered([f.key for f in facts])
    local_of = _local_claims(facts, node_of, rejected) if whole_world and usable else None
    var = next((f.node_var for f in facts if f.node_var), "NODE_RANK")
    if by_keys:
        source = HOST_KEYS + (", local ranks from LOCAL_RANK" if local_of is not None else "")
    else:
        source = f"launcher variables ({var}{', LOCAL_RANK' if local_of is not None else ''})"
    if local_of is None:
        local_of = _positions(node_of)
    return Verdict(tuple(node_of), tuple(local_of), len(set(node_of)), source, by_keys,
                   tuple(rejected), tuple(_collisions(facts)))


def _describes_world(facts: Sequence[NodeFacts], rejected: list[str]) -> bool:
    """RANK and WORLD_SIZE, where set, are the group's own (else no claim describes it)."""
    size = len(facts)
    wrong = [i for i, f in enumerate(facts)
             if (f.rank is not None and f.rank != i) or (f.world is not None and f.world != size)]
    if wrong and _claims_anything(facts):
        rejected.append(f"RANK / WORLD_SIZE on rank(s) {_ranks(wrong)} do not match the process "
                        f"group ({size} ranks): the launcher's variables describe another launch")
        return False
    return True


def _claims_anything(facts: Sequence[NodeFacts]) -> bool:
    return any(f.node is not None or f.local_rank is not None or f.local_size is not None
               for f in facts)


def _nodes_from_claims(facts: Sequence[NodeFacts], whole_world: bool,
                       rejected: list[str]) -> list[int] | None:
    claims = [f.node for f in facts]
    if all(c is None for c in claims):
        return None
    var = next(f.node_var for f in facts if f.node_var)
    unset = [i for i, c in enumerate(claims) if c is None]
    if unset:
        rejected.append(f"{var} is unset on rank(s) {_ranks(unset)}")
        return None
    nodes = sorted({c for c in claims if c is not None})
    problems = []
    if whole_world and nodes != list(range(len(nodes))):
        problems.append(f"{var} values {nodes} are not 0..{len(nodes) - 1}")
    sizes = sorted({f.num_nodes for f in facts if f.num_nodes is not None})
    if whole_world and sizes and sizes != [len(nodes)]:
        problems.append(f"GROUP_WORLD_SIZE says {'/'.join(map(str, sizes))} but {var} names "
                        f"{len(nodes)} node(s)")
    for node in nodes:
        hosts = list(dict.fromkeys(f.where() for f in facts if f.node == node))
        if len(hosts) > 1:
            problems.append(f"{var}={node} is claimed from {len(hosts)} hosts "
                            f"({', '.join(hosts)})")
    if problems:
        rejected.append("; ".join(problems))
        return None
    if whole_world:
        return [c for c in claims if c is not None]
    return _numbered(claims)  # a subgroup: its own nodes, numbered by their lowest member


def _local_claims(facts: Sequence[NodeFacts], node_of: list[int],
                  rejected: list[str]) -> list[int] | None:
    """LOCAL_RANK of every member where the claims agree with ``node_of``, else None."""
    if all(f.local_rank is None and f.local_size is None for f in facts):
        return None
    problems = []
    claims = [f.local_rank for f in facts]
    unset = [i for i, c in enumerate(claims) if c is None]
    if unset:
        problems.append(f"LOCAL_RANK is unset on rank(s) {_ranks(unset)}")
    for node in sorted(set(node_of)):
        members = [i for i, n in enumerate(node_of) if n == node]
        claimed = sorted(c for c in (claims[i] for i in members) if c is not None)
        if not unset and claimed != list(range(len(members))):
            problems.append(f"node {node} (ranks {_ranks(members)}) has LOCAL_RANK "
                            f"{claimed}, not 0..{len(members) - 1}")
        sizes = sorted({s for s in (facts[i].local_size for i in members) if s is not None})
        if sizes and sizes != [len(members)]:
            problems.append(f"node {node} runs {len(members)} rank(s) but LOCAL_WORLD_SIZE says "
                            f"{'/'.join(map(str, sizes))}")
    if problems:
        rejected.append("; ".join(problems))
        return None
    return [c for c in claims if c is not None]  # all set (checked above)


def _numbered(keys: Sequence[object]) -> list[int]:
    """Each key's index among the distinct keys, numbered by their lowest member."""
    order = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return [order[key] for key in keys]


def _positions(node_of: Sequence[int]) -> list[int]:
    """Each member's index among the members of its node, in group rank order."""
    seen: dict[int, int] = {}
    out = []
    for node in node_of:
        out.append(seen.get(node, 0))
        seen[node] = out[-1] + 1
    return out


def _collisions(facts: Sequence[NodeFacts]) -> list[str]:
    """Host names that more than one node uses, with each node's address."""
    by_host: dict[str, dict[str | None, None]] = {}
    for f in facts:
        by_host.setdefault(f.host, {})[f.address] = None
    return [f"host name {host!r} is used by {len(addrs)} hosts "
            f"({', '.join(str(a) for a in addrs)})"
            for host, addrs in by_host.items() if len(addrs) > 1]


def _ranks(ranks: Sequence[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


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
    changed = launcher.changed_since_import()
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
    if dist.get_world_size(group) != world or launcher.accelerate_came_first():
        return None  # a subgroup's members must be gathered; Accelerate's LOCAL_* checked
    get = launcher.get_int
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


def layout_from_gather(group: dist.ProcessGroup, timeout: timedelta,
                       liveness: float | None) -> NodeLayout:
    """The layout from one gather of every member's :class:`NodeFacts` (collective).

    The gather is a side-channel operation on a lane of its own (whichever thread asks first
    on each rank): bounded by ``timeout``, and a member that is dead, frozen or in another call
    is named as in every guard or barrier.
    """
    from accel_utils._side import close, lane_for  # the side channel needs torch's groups

    lane = lane_for(group, "node-identity")
    try:
        raw = lane.gather(lane.begin(), "node identity", json.dumps(asdict(local_facts())).encode(),
                          timeout, liveness)
    finally:
        close(group, "node-identity")
    facts = [NodeFacts(**json.loads(r)) for r in raw]
    me = dist.get_rank(group)
    verdict = decide(facts, whole_world=len(facts) == dist.get_world_size())
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
