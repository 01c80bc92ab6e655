"""The lanes of this process: one per parent group and thread, made on first use.

A guard, barrier or probe asks :func:`lane_for` for its lane; a lane lives as long as its parent
group (or until :func:`close` / :func:`release_all`). See :mod:`accel_utils._side.lane` for what
a lane does.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore

from accel_utils._identity_cache import IdentityCache
from accel_utils._side import life
from accel_utils._side.gloo import WaitlessStore
from accel_utils._side.heartbeat import Pulse
from accel_utils._side.lane import Lane
from accel_utils._side.wire import Mark, Phase, mark_key

logger = logging.getLogger("accel_utils.side_channel")

_lanes = IdentityCache()  # parent group -> {thread name: Lane}; entries die with their parent
_DEFAULT_THREAD_NAME = re.compile(r"Thread-\d+( \(.*\))?$|ThreadPoolExecutor-\d+_\d+$")


def lane_for(parent: dist.ProcessGroup, purpose: str = "") -> Lane:
    """This thread's lane on ``parent`` (created on first use; no collective, no waiting).

    Threads other than the main one get lanes of their own, matched across ranks by thread
    name: a guard in thread "loader" on one rank pairs with thread "loader" on the others.
    With ``purpose``, the lane of that name whatever the thread (the library's own calls that
    every rank makes once, from whichever thread asks first).
    """
    thread = threading.current_thread()
    tag = purpose or ("" if thread is threading.main_thread() else thread.name)
    lanes: dict[str, Lane] = _lanes.setdefault(parent, dict)
    lane: Lane | None = lanes.get(tag)
    if lane is None:
        if not purpose and _DEFAULT_THREAD_NAME.match(tag):
            logger.warning(
                "side channel for thread %r: threads are matched across ranks by name, and a "
                "default name counts the threads this process started before (a logger or "
                "tracker started on some ranks only shifts it), so the other ranks may call "
                "theirs differently and this thread's guards and barriers would wait for the "
                "timeout. Name the thread the same on every rank: threading.Thread(name=...), "
                "ThreadPoolExecutor(thread_name_prefix=...)", tag)
        name = parent.group_name + (f"/thread:{tag}" if tag else "")
        connection = life.connection()  # the process's one: no new connection per lane
        prefix = f"accel_utils/side/{name}"
        rank, size = dist.get_rank(parent), dist.get_world_size(parent)
        members = dist.get_process_group_ranks(parent)
        pulse = Pulse(PrefixStore(prefix, connection), rank, size, name, connection, members)
        link = WaitlessStore(PrefixStore(prefix, connection))
        lane = lanes[tag] = Lane(name, rank, size, frozenset(members), link, pulse)
        lane.pulse.store(lambda s: s.set(mark_key(rank), str(Mark(0, Phase.NONE, 0))), None)
    return lane


def close(parent: dist.ProcessGroup, purpose: str) -> None:
    """Forget the ``purpose`` lane of ``parent`` after its last operation (every member does)."""
    lanes: dict[str, Lane] | None = _lanes.get(parent)
    lane = None if lanes is None else lanes.pop(purpose, None)
    if lane is not None:  # nothing is pending on its group: freed now, not at exit
        _release(lane)


def side_group(parent: dist.ProcessGroup, limit: timedelta, what: str = "side group") -> Any:
    """The gloo group of this thread's lane on ``parent``, created if it has none (collective
    over ``parent``'s members then, waiting at most ``limit``)."""
    lane = lane_for(parent)
    if lane.group is None:
        lane.connect(lane.begin(), what, limit, None)
    return lane.group


def lane_count() -> int:
    """How many parent groups have lanes (for tests of the lifecycle)."""
    return len(_lanes)


def release_all() -> None:
    """Forget every lane (stopping its threads), so that its groups end now, not at exit; the
    lanes of parent groups freed already too (their trees' threads still hold side groups)."""
    for lanes in _lanes.drain():
        for lane in lanes.values():
            _release(lane)


def _release(lane: Lane) -> None:
    lane.pulse.stop()
    if lane.tree is not None:
        lane.tree.close()
    lane.group = lane.tree = lane.work = None
