"""Whether a directory is one filesystem shared by the nodes of a job, or node-local.

:class:`~accel_utils.first_rank.FirstRankPerNode` (``local="auto"``) and the doctor ask this
to choose between global and per-node order for a cache directory.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from typing import Any

import torch

from accel_utils.barriers import _all_reduce_or_raise, _as_timeout, _channel

logger = logging.getLogger(__name__)

_PROBE = ".accel_utils_shared_probe"
_WHAT = "path_is_shared"


def path_is_shared(path: str | os.PathLike[str], group: Any = None, *,
                   timeout: timedelta = timedelta(minutes=5)) -> bool:
    """Whether ``path`` is one directory shared by all nodes of ``group``.

    Collective over ``group``'s members: each node's local rank 0 writes a marker naming its
    node into ``path`` (created if missing), all wait, each looks for the other nodes' markers,
    then the markers are removed. Three small all-reduces on the side channel. Marker names
    are new each time, so NFS's cached negative lookups cannot hide them.

    Args:
        path: the directory to probe.
        group: anything :func:`accel_utils.resolve` accepts.
        timeout: how long each step waits for the other ranks.

    Returns:
        True when any node sees another node's marker (a shared, or partly shared, filesystem:
        global order is the safe choice) or when there is only one node; False otherwise.

    Raises:
        OSError: a node leader could not write its marker (on every rank).
        BarrierTimeoutError / RuntimeError: a rank did not take part in time or was lost.
    """
    limit = _as_timeout(timeout)
    topo, channel = _channel(group, limit)
    nodes = topo.nodes
    if nodes.num_nodes == 1 or topo.world_size == 1:
        return True
    if channel is None:
        raise RuntimeError("path_is_shared: no gloo side group (see the warning above)")
    leader = nodes.local_rank == 0
    token = torch.tensor([secrets.randbits(62) if topo.rank == 0 else 0])
    _all_reduce_or_raise(channel, token, limit, _WHAT)
    name = f"{_PROBE}_{token.item():x}_node"
    marker = os.path.join(os.fspath(path), f"{name}{nodes.node_rank}")
    failed = torch.zeros(1, dtype=torch.int64)  # leaders that could not write their marker
    seen = torch.zeros(1, dtype=torch.int64)  # other nodes' markers the leaders saw
    try:
        if leader:
            try:
                os.makedirs(path, exist_ok=True)
                with open(marker, "w") as fh:
                    fh.write(str(nodes.node_rank))
            except OSError as exc:
                logger.error("rank %d could not write %s: %s", topo.rank, marker, exc)
                failed[0] = 1
        _all_reduce_or_raise(channel, failed, limit, _WHAT)
        if failed.item() > 0:
            raise OSError(f"{failed.item()} node leader(s) could not write a marker into {path}")
        if leader:
            others = (n for n in range(nodes.num_nodes) if n != nodes.node_rank)
            seen[0] = sum(os.path.exists(os.path.join(path, f"{name}{n}")) for n in others)
        _all_reduce_or_raise(channel, seen, limit, _WHAT)
    finally:
        if leader and os.path.exists(marker):
            os.remove(marker)
    return seen.item() > 0
