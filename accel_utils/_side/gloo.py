"""Gloo side groups themselves: creation with few sockets, descriptor limits, parking.

The protocol lives in :mod:`accel_utils._side.lane`; this module knows how a
gloo group is made (lazily connected, so a rank holds sockets to its ring neighbours only), how
to tell a process that has no descriptors left for one, how to wait on its operations a slice at
a time, and where abandoned groups go: parked in a daemon thread's frame, destroyed only once
nothing of them is busy (a gloo group's destructor waits for its pending operations, which would
keep a failing rank from raising or exiting).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import resource
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_FDS_PER_GROUP = 16  # a lazy side group holds ~6 (a store connection, a listener, 2 ring pairs)
_FREE_POLL_S = 1.0  # how often the keeper looks for parked groups it may free


class _Keeper:
    """Holds parked groups from a daemon thread's frame, so no destructor runs on them early.

    A gloo group's destructor joins its threads with the GIL held: with an operation pending,
    or a pair still connecting to a dead peer, that froze the whole process (the fault matrix,
    with a keeper that freed every finished group). So a group is freed only on evidence that
    nothing of it is busy: the operation it was parked with completed *successfully* (every
    member contributed, so its pairs are connected and its threads idle), as after a first
    rank's reported failure or a mismatch. A group parked after a death, a timeout or a lost
    store stays parked until the process ends.
    """

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[tuple[Any, ...], Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.count = 0  # groups (or connection attempts) parked so far
        self.freed = 0  # of those, freed by the keeper

    def park(self, objects: tuple[Any, ...], work: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._hold, name="accel-utils-parked",
                                            daemon=True)
            self._thread.start()
        self._inbox.put((objects, work))
        self.count += 1

    def _hold(self) -> None:
        kept: list[tuple[tuple[Any, ...], Any]] = []
        while True:
            with contextlib.suppress(queue.Empty):
                kept.append(self._inbox.get(timeout=_FREE_POLL_S))
            busy = [item for item in kept if not _succeeded(item[1])]
            if len(busy) < len(kept):
                self.freed += len(kept) - len(busy)
                kept = busy  # the last references to the others go: their groups end here


def _succeeded(work: Any) -> bool:
    """Whether ``work`` (a parked group's last operation) completed without an error."""
    try:
        return work is not None and work.is_completed() and work.exception() is None
    except Exception:  # noqa: BLE001 - no verdict: keep the group
        return False


_keeper = _Keeper()


def park(*objects: Any, work: Any = None) -> None:
    """Keep ``objects`` (a group that may hold a pending operation) alive; they are freed once
    ``work``, the group's last operation, has completed successfully (never without one)."""
    _keeper.park(objects, work)


def parked_count() -> int:
    """How many abandoned groups (or connection attempts) this process has parked so far."""
    return _keeper.count


def held_count() -> int:
    """How many parked groups (or connection attempts) are still held, not freed."""
    return _keeper.count - _keeper.freed


def descriptors_short(rank: int, need: int = 0) -> str:
    """Why this process cannot open a side group's sockets ("" when it can, or cannot tell)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError as exc:  # no descriptor left to list them; or not Linux: gloo will say
        if exc.errno != errno.EMFILE:
            return ""
        used = soft
    need = max(need, _FDS_PER_GROUP)
    if soft == resource.RLIM_INFINITY or soft - used >= need:
        return ""
    wanted = max(used + need * 64, 4096)
    return (f"rank {rank} cannot open the side channel's sockets: {used} of its {soft} file "
            f"descriptors (RLIMIT_NOFILE soft limit; hard limit {hard}) are in use and a side "
            f"group needs about {need} more. Raise the limit before launching (`ulimit -n "
            f"{wanted}` in the job script, or resource.setrlimit(resource.RLIMIT_NOFILE, "
            f"({wanted}, hard)) at start-up; above the hard limit it takes the cluster's "
            "limits.conf / container ulimit settings)")


def connect_gloo(store: Any, rank: int, size: int, limit: timedelta) -> Any:
    """A gloo group whose members connect only to the peers its all-reduce uses.

    Gloo connects every pair at creation by default: ``size - 1`` sockets per process, which
    at thousands of ranks exhausts descriptor limits. Lazily, its ring all-reduce connects each
    member to its two neighbours; one all-reduce here makes those connections (and makes the
    creation a rendezvous of all members again), so no later operation has to wait for them.
    """
    gloo: Any = dist.ProcessGroupGloo  # the stubs lack _Options and the backend's collectives
    options = gloo._Options()
    options._timeout = limit
    names = [n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
    options._devices = ([gloo.create_device(interface=n, lazy_init=True) for n in names]
                        or [gloo.create_default_device(lazy_init=True)])
    group = gloo(store, rank, size, options)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.BOR  # type: ignore[assignment]  # stubs: RedOpType
    group.allreduce([torch.zeros(1, dtype=torch.int64)], opts).wait()
    return group


def finished(work: Any) -> Callable[[timedelta], bool]:
    """Waits on ``work`` a slice at a time: False while pending, else gloo's own verdict."""

    def wait(slice_: timedelta) -> bool:
        try:
            work.wait(slice_)
        except RuntimeError:
            if not work.is_completed():  # only our slice ran out
                return False
            work.wait()  # raises gloo's error: a timeout or a lost peer
        return True

    return wait


def set_timeout(group: Any, timeout: timedelta) -> None:
    """Change a gloo group's timeout (public from torch 2.13, private before)."""
    setter = getattr(group, "set_timeout", None) or group._set_default_timeout
    setter(timeout)
