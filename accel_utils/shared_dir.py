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

from accel_utils._side import (
    DEFAULT_LIVENESS,
    PAYLOAD_BITS,
    Kind,
    as_liveness,
    as_timeout,
    lane_for,
)
from accel_utils.topology import node_layout, resolve

logger = logging.getLogger(__name__)

_PROBE = ".accel_utils_shared_probe"
_WHAT = "path_is_shared"


def path_is_shared(path: str | os.PathLike[str], group: Any = None, *,
                   # 5 min: between steps each node leader makes a directory, writes or stats one
                   # small file: seconds even on a slow network filesystem, so a longer wait would
                   # only delay the error when a mount hangs.
                   timeout: Any = timedelta(minutes=5), liveness: Any = DEFAULT_LIVENESS) -> bool:
    """Whether ``path`` is one directory shared by all nodes of ``group``.

    Collective over ``group``'s members: each node's local rank 0 writes a marker naming its
    node into ``path`` (created if missing), all wait, each looks for the other nodes' markers,
    then the markers are removed. Three one-element all-reduces on the side channel. Marker
    names are new each time, so NFS's cached negative lookups cannot hide them.

    Args:
        path: the directory to probe.
        group: anything :func:`accel_utils.resolve` accepts.
        timeout: how long each step waits for the other ranks.
        liveness: see :func:`accel_utils.barrier`.

    Returns:
        True when any node sees another node's marker (a shared, or partly shared, filesystem:
        global order is the safe choice) or when there is only one node; False otherwise.

    Raises:
        OSError: a node leader could not write its marker (on every rank).
        BarrierTimeoutError / SideChannelError: a rank did not take part in time or was lost.
    """
    limit, live = as_timeout(timeout), as_liveness(liveness)
    topo = resolve(group)
    if topo.world_size == 1 or topo.group is None:
        return True
    nodes = node_layout(topo.group, limit, live)
    if nodes.num_nodes == 1:
        return True
    lane = lane_for(topo.group)

    def step(bits: int) -> int:  # the OR of every rank's bits
        return lane.run(lane.begin(), Kind.PROBE, "", _WHAT, limit, live, bits).payload

    leader = nodes.local_rank == 0
    node_bit = 1 << min(nodes.node_rank, PAYLOAD_BITS - 1)  # the last nodes share the last bit
    token = step(secrets.randbits(PAYLOAD_BITS) if topo.rank == 0 else 0)
    name = f"{_PROBE}_{token:x}_{lane.seq}_node"
    marker = os.path.join(os.fspath(path), f"{name}{nodes.node_rank}")
    try:
        failed = 0  # this leader could not write its marker
        if leader:
            try:
                os.makedirs(path, exist_ok=True)
                with open(marker, "w") as fh:
                    fh.write(str(nodes.node_rank))
            except OSError as exc:
                logger.error("rank %d could not write %s: %s", topo.rank, marker, exc)
                failed = node_bit
        failed = step(failed)
        if failed:
            raise OSError(f"{bin(failed).count('1')} node leader(s) could not write a marker "
                          f"into {path}")
        seen = 0  # this leader saw another node's marker
        if leader:
            others = (n for n in range(nodes.num_nodes) if n != nodes.node_rank)
            seen = int(any(os.path.exists(os.path.join(path, f"{name}{n}")) for n in others))
        return step(seen) > 0
    finally:
        if leader and os.path.exists(marker):
            os.remove(marker)
