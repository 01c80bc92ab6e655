"""Gloo side groups themselves: creation with few sockets, descriptor limits, parking.

The protocol lives in :mod:`accel_utils._side.lane`; this module knows how a
gloo group is made (lazily connected, so a rank holds sockets to its tree neighbours only), how
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
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from accel_utils._side.tree import reduce_or

_WAIT_POLL_MAX_S = 1.0  # the slowest pace at which gloo's store waits look for a late peer
_FDS_PER_GROUP = 16  # a lazy side group holds ~5 (a listener, 2 tree pairs on average, ...)
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
            with contextlib.suppress(queue.Empty):  # idle: sleep until something is parked
                kept.append(self._inbox.get(timeout=_FREE_POLL_S if kept else None))
            busy = [item for item in kept if not succeeded(item[1])]
            if len(busy) < len(kept):
                self.freed += len(kept) - len(busy)
                kept = busy  # the last references to the others go: their groups end here


def succeeded(work: Any) -> bool:
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


class WaitlessStore(dist.Store):  # type: ignore[misc,name-defined]  # stubs lack Store
    """A store connection as gloo sees it: ``wait`` looks for the keys at a slowing pace instead
    of holding the connection in a server-side wait, and a key found is read in that request.

    Gloo waits for a peer's address in the store before its first message to that peer, then
    reads it. A server-side wait would block the connection until a late peer arrives, so every
    group would need a connection of its own; each new connection costs the store's one thread
    a reverse-DNS look-up (see :func:`connect_gloo`). Polling lets every group and every
    lane's heartbeat share the process's one side connection. Its load stays small: only the
    members next to a late peer in the tree poll, within a second ten times, then once a second.
    A look-up is one request (a ``compare_set`` that cannot match returns the value, where
    ``check`` then ``get`` would be three: torch's ``get`` waits first), so creating a group
    costs the store about four requests per rank.

    Gloo calls back into this object from C++, which fails once its Python object is gone:
    whoever holds a group made on it holds it too (the lane, the group's :class:`~.tree.Tree`,
    parking).
    """

    _ABSENT = b"\0accel-utils: no such key\0"  # what a look-up of a missing key returns

    def __init__(self, store: Any) -> None:
        super().__init__()
        self._store = store
        self._found: dict[str, bytes] = {}  # values read by wait, for the get that follows
        self.requests = 0  # for the scale benchmark

    def set(self, key: str, value: Any) -> None:
        self.requests += 1
        self._store.set(key, value)

    def get(self, key: str) -> bytes:
        found = self._found.pop(key, None)
        if found is not None:
            return found
        self.requests += 1
        return bytes(self._store.get(key))

    def check(self, keys: list[str]) -> bool:
        return all(self._look_up(key) for key in keys)

    def add(self, key: str, value: int) -> int:
        self.requests += 1
        return int(self._store.add(key, value))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        limit = (timeout or self._store.timeout).total_seconds()
        deadline, pause = time.monotonic() + limit, 0.001
        while not self.check(keys):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"waited {limit:g}s for {', '.join(keys)} in the job's store: "
                                   "a member did not create the side group")
            time.sleep(min(pause, left))
            pause = min(2 * pause, _WAIT_POLL_MAX_S)

    def _look_up(self, key: str) -> bool:
        """Whether ``key`` exists; its value is kept for the next :meth:`get` of it."""
        if key in self._found:
            return True
        self.requests += 1
        value = bytes(self._store.compare_set(key, self._ABSENT, self._ABSENT))
        if value == self._ABSENT:  # missing: compare_set sets only over an empty expectation
            return False
        self._found[key] = value
        return True


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
    """A gloo group whose members connect only to the peers the side channel's tree uses.

    Gloo connects every pair at creation by default: ``size - 1`` sockets per process, which
    at thousands of ranks exhausts descriptor limits. Lazily, a member connects to a peer when
    it first sends to or receives from it; one reduction over the tree (:mod:`.tree`) here makes
    those connections, ``log2`` of the members deep (gloo's ring would make them one after the
    other, ``size`` deep), and makes the creation a rendezvous of all members again.

    ``store`` is a :class:`WaitlessStore` over the process's side connection, under the group's
    prefix: creating a group opens no store connection. New connections are what made creation
    slow at scale: the job's store (torch's TCPStore server) resolves every new client's address
    back to a host name (``getnameinfo`` without ``NI_NUMERICHOST``) on its one event-loop
    thread, so one reverse-DNS query that the resolver drops stalls the whole store for the
    resolver's timeout (5 s by default; seen here on 1 query in ~200, and it would be every
    query where reverse DNS is broken).
    """
    gloo: Any = dist.ProcessGroupGloo  # the stubs lack _Options and the backend's collectives
    options = gloo._Options()
    options._timeout = limit
    names = [n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
    options._devices = ([gloo.create_device(interface=n, lazy_init=True) for n in names]
                        or [gloo.create_default_device(lazy_init=True)])
    group = gloo(store, rank, size, options)
    reduce_or(group, rank, size, torch.zeros(1, dtype=torch.int64), limit)
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
