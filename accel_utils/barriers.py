"""Barriers on the side channel: bounded waits that name the ranks that did not arrive.

:func:`barrier` and :func:`barrier_and_log` are the library's barriers. The underscore names
``_barrier_with_timeout`` (False instead of an exception) and ``_create_gloo_group`` are NeMo
Automodel's, kept as a compatibility surface for ported code and built on the same lane; the
library itself never calls them.

Each parent group (the default group, a subgroup, an Accelerator's group) gets one gloo side
group (see :mod:`accel_utils._side`), created on first use and reused by every later
barrier and guard on that parent. Waits run there with their own timeout, so a long wait never
trips the NCCL watchdog of the parent. A quick barrier costs one one-element all-reduce.

Creating a side group is collective over the parent group's members (not the whole world):
every member must make its barrier / guard calls on a parent in the same order (a mismatch
raises on every rank). Non-members take no part.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

import torch.distributed as dist

from accel_utils._side import (
    DEFAULT_LIVENESS,
    Kind,
    Lane,
    as_liveness,
    as_timeout,
    lane_for,
    side_group,
)
from accel_utils.errors import BarrierTimeoutError, FirstRankFailedError, SideChannelError
from accel_utils.topology import Topology, node_layout, resolve

logger = logging.getLogger(__name__)

# 30 min: torch's default process-group timeout, so a barrier waits for a late rank (one still
# writing a checkpoint, say) as long as a collective on the job's own group would; a dead or
# frozen rank is named after `liveness` anyway.
_LOG_TIMEOUT = timedelta(minutes=30)


def _lane(group: Any, limit: timedelta, liveness: float | None) -> tuple[Topology, Lane | None]:
    """The caller's topology and, for more than one rank, this thread's lane on its group."""
    topo = resolve(group)
    if topo.world_size == 1 or topo.group is None:
        return topo, None
    nodes = node_layout(topo.group, limit, liveness)
    lane = lane_for(topo.group)
    lane.post_place(nodes.node_rank, nodes.local_rank, None)
    return topo, lane


def _create_gloo_group(group: Any = None, timeout: Any = _LOG_TIMEOUT) -> Any:
    """The gloo side group of ``group``: created on first use, then cached and reused.

    Collective over ``group``'s members the first time (see the module docstring).

    Args:
        group: anything :func:`accel_utils.resolve` accepts; ``None`` is the default group.
        timeout: how long creating it waits for the other members.

    Returns:
        A ``torch.distributed.ProcessGroupGloo`` over ``group``'s members, or None when no
        process group is initialised or the side group could not be created (with a warning).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    topo = resolve(group)
    assert topo.group is not None
    try:
        return side_group(topo.group, as_timeout(timeout), "_create_gloo_group")
    except RuntimeError as exc:
        logger.warning("could not create a gloo side group for group %r: %s",
                       topo.group.group_name, exc)
        return None


def barrier(group: Any = None, *, timeout: Any = _LOG_TIMEOUT,
            liveness: Any = DEFAULT_LIVENESS) -> None:
    """Wait until every rank of ``group`` arrives; raise, naming who did not, if they don't.

    Waits on the gloo side group of ``group`` (never on an NCCL group, so a long wait does not
    trip the NCCL watchdog). One small all-reduce; nothing for a single process.

    Args:
        group: anything :func:`accel_utils.resolve` accepts; ``None`` is the default group.
        timeout: a ``datetime.timedelta`` or seconds; must be positive (at most 30 days).
        liveness: seconds (or a timedelta) without a heartbeat after which a rank inside the
            barrier counts as not responding; None turns that off.

    Raises:
        ValueError: ``timeout`` is not positive.
        TypeError: ``timeout`` is neither a timedelta nor a number.
        BarrierTimeoutError: some ranks did not arrive in time or stopped responding (names
            them; :class:`RanksNotRespondingError` for the latter).
        FirstRankFailedError: a rank inside the barrier died (names it).
        SideChannelError: the job's store was lost, a rank died, or the ranks met in
            different calls (``calls`` says which).
    """
    limit, live = as_timeout(timeout), as_liveness(liveness)
    _, lane = _lane(group, limit, live)
    if lane is not None:
        lane.run(lane.begin(), Kind.BARRIER, "", "barrier", limit, live)


def _barrier_with_timeout(timeout: Any, group: Any = None, *,
                          liveness: Any = DEFAULT_LIVENESS) -> bool:
    """Wait until every rank of ``group`` arrives, or until ``timeout`` passes.

    Waits on the gloo side group of ``group`` (never on an NCCL group). One small all-reduce.

    Args:
        timeout: a ``datetime.timedelta`` or seconds; must be positive (at most 30 days).
        group: anything :func:`accel_utils.resolve` accepts; ``None`` is the default group.
        liveness: seconds (or a timedelta) without a heartbeat after which a rank inside the
            barrier counts as not responding; None turns that off.

    Returns:
        True when all ranks arrived (at once for a single process); False otherwise, with a
        warning that names the ranks that did not arrive, stopped responding or died.

    Raises:
        ValueError: ``timeout`` is not positive.
        TypeError: ``timeout`` is neither a timedelta nor a number.
        SideChannelError: the ranks made different calls (this barrier met another call).
    """
    try:
        barrier(group, timeout=timeout, liveness=liveness)
    except (BarrierTimeoutError, FirstRankFailedError, SideChannelError) as err:
        if isinstance(err, SideChannelError) and err.calls:
            raise
        logger.warning("barrier failed on rank %d: %s", resolve(group).rank, err)
        return False
    return True


def barrier_and_log(string: str, group: Any = None, *, timeout: Any = _LOG_TIMEOUT,
                    liveness: Any = DEFAULT_LIVENESS) -> None:
    """Barrier, then one log record on rank 0 with the time, the wait and the last rank to arrive.

    The last rank is read from an arrival counter in the job's store, not from clocks.
    ``string`` names the barrier: pass the same one on every rank (ranks that meet in
    different barriers raise instead of pairing silently).

    Args:
        string: the message to log.
        group: anything :func:`accel_utils.resolve` accepts (an ``Accelerator`` too).
        timeout: how long to wait for the other ranks (torch's default: 30 minutes).
        liveness: see :func:`barrier`.

    Raises:
        BarrierTimeoutError: some ranks did not arrive in time or stopped responding (names them).
        SideChannelError: the job's store was lost, or ranks met in different calls.
        FirstRankFailedError: a rank inside the barrier died (names it).
    """
    limit, live = as_timeout(timeout), as_liveness(liveness)
    start = time.monotonic()
    topo, lane = _lane(group, limit, live)
    last = 0
    if lane is not None:
        seq = lane.begin()
        arrived, last_key = f"log/{seq}/arrivals", f"log/{seq}/last"
        if lane.pulse.store(lambda s: s.add(arrived, 1), live) == topo.world_size:
            lane.pulse.store(lambda s: s.set(last_key, str(topo.rank)), live)
        lane.run(seq, Kind.LOG, string, "barrier_and_log", limit, live)
        if topo.rank == 0:
            last = int(lane.pulse.store(lambda s: (s.get(last_key), s.delete_key(last_key),
                                             s.delete_key(arrived))[0], live))
    if topo.rank == 0:
        logger.info(
            "[%s] %s (barrier took %.3fs; last to arrive: rank %d)",
            datetime.now().isoformat(timespec="milliseconds"),
            string,
            time.monotonic() - start,
            last,
        )
