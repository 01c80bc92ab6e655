"""This process's sign of life: a slow beat from the first process group until its end.

A lane's heartbeat runs only inside an operation, so it cannot tell a member that died before
its first guard from one that is still loading data. This beat can: one daemon thread, started
at ``import accel_utils``, waits (without importing anything) for ``torch.distributed`` to have
a default group, then writes ``count pid host`` under ``accel_utils/life/<global rank>`` in the
job's store every ``LIFE_BEAT_S``, on a store connection of its own, until that group is
destroyed; a new default group (a new launch in a reused process) starts it again. Waiting
members read the marks of watched members that have not arrived (see
:class:`~accel_utils._side.heartbeat.Pulse`): a mark that stands still means the process
froze or died, and a process gone from this host is known to be dead at once. One store request
per process per ``LIFE_BEAT_S``: flat per node whatever the world size.

The same write carries this process's training progress (:data:`PROGRESS`: node, step, phase),
which :class:`accel_utils.HangWatch` sets with plain attribute writes: a watch adds no store
request while training goes well, and a stall report can say where a silent rank last was.

Standard library only at import: torch is looked up in ``sys.modules``, never imported here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from accel_utils._side.timing import LIFE_BEAT_S, POLL_S

logger = logging.getLogger("accel_utils.side_channel")

_WATCH_S = POLL_S  # how often the thread looks for a new (or destroyed) default group
PREFIX = "accel_utils/life"


class Progress:
    """This process's training progress, as a :class:`~accel_utils.HangWatch` last set it."""

    node = -1  # the launcher's node rank (-1: unknown)
    step = -1  # steps begun (-1: no watch running)
    phase = "-"  # a word without spaces


PROGRESS = Progress()


@dataclass(frozen=True)
class Life:
    """A process's latest sign of life: a counter, its pid and host name, and its progress."""

    count: int
    pid: int
    host: str
    node: int = -1
    step: int = -1
    phase: str = "-"

    @classmethod
    def parse(cls, raw: bytes | str) -> Life:
        count, pid, host, node, step, phase = (
            raw.decode() if isinstance(raw, bytes) else raw).split(" ", 5)
        return cls(int(count), int(pid), host, int(node), int(step), phase)

    def __str__(self) -> str:
        return f"{self.count} {self.pid} {self.host} {self.node} {self.step} {self.phase}"

    def gone_from_this_host(self) -> bool:
        """Its process no longer exists, as far as this host can tell (False elsewhere)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by another user
            return False
        try:  # a killed process that its parent has not reaped yet is dead all the same
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
        except (OSError, IndexError):
            return False


def life_key(global_rank: int) -> str:
    return f"{PREFIX}/{global_rank}"


class _Beat:
    """The thread: follows the default group, beats into its store."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._beaten = threading.Condition()
        self.beats = 0  # beats written so far (into whichever group's store)

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="accel-utils-life",
                                                 daemon=True)
                self._thread.start()

    def _run(self) -> None:
        world: Any = None
        store: Any = None
        count, rank, host, failing = 0, -1, socket.gethostname(), False
        while True:
            self._wake.wait(_WATCH_S if store is None else LIFE_BEAT_S)
            self._wake.clear()
            current = _default_group()
            if current is not world:
                world, store, count = current, None, 0
                if world is not None:
                    try:
                        store, rank = _own_store(world)
                    except Exception:  # noqa: BLE001 - destroyed meanwhile: look again next time
                        world = None
            if store is None:
                continue
            count += 1
            try:
                now = PROGRESS
                store.set(life_key(rank), str(Life(count, os.getpid(), host, now.node,
                                                   now.step, now.phase)))
                if failing:
                    logger.info("sign of life reaches the job's store again")
                failing = False
                with self._beaten:
                    self.beats += 1
                    self._beaten.notify_all()
            except Exception as exc:  # noqa: BLE001 - the store's host may be gone: say so once
                if not failing and _default_group() is world:  # not a group destroyed meanwhile
                    logger.warning("could not write this process's sign of life into the job's "
                                   "store (%s): the other ranks may name it not responding", exc)
                failing = True


    def beat_now(self, wait_s: float) -> bool:
        """Beat now, not at the next period; whether a beat was written within ``wait_s``."""
        self.start()
        with self._beaten:
            target = self.beats + 1
            self._wake.set()
            return self._beaten.wait_for(lambda: self.beats >= target, wait_s)


def _default_group() -> Any:
    """The current default process group, or None (torch.distributed is never imported)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD


def _own_store(world: Any) -> tuple[Any, int]:
    # Its own connection, not the lanes' (:func:`connection`): a clone that hangs (a group
    # destroyed meanwhile, its store gone) must not hold up the side channel, nor it this beat.
    dist = sys.modules["torch.distributed"]
    return root_store(world.get_group_store()).clone(), dist.get_rank()


_shared: tuple[Any, Any] = (lambda: None, None)  # (a default group's weakref, its connection)
_shared_lock = threading.Lock()


def connection() -> Any:
    """This process's side connection to the job's store, opened once per default group by
    its first lane.

    Every request of the side channel's lanes goes over it (heartbeats, gloo's address
    look-ups), none of them waiting in the store, so none blocks the others for long; torch's
    own connection is left to torch, whose waits would, and this thread keeps its own. One
    connection, not one per lane or group: each new one costs the store a reverse-DNS look-up
    (see :func:`accel_utils._side.gloo.connect_gloo`).
    """
    global _shared
    world = _default_group()
    if world is None:
        raise RuntimeError("no default process group: the side channel needs the job's store")
    with _shared_lock:
        if _shared[0]() is not world:  # a weak reference: a destroyed group must be freed
            _shared = (weakref.ref(world), root_store(world.get_group_store()).clone())
        return _shared[1]


def root_store(store: Any) -> Any:
    """The job's store under a group's prefixes (every group of a job shares it)."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store


_beat = _Beat()


def start() -> None:
    """Start the thread (once per process; done at ``import accel_utils``)."""
    _beat.start()


def beat_now(wait_s: float) -> bool:
    """Write this process's sign of life (and progress) now; False if not within ``wait_s``
    (no default group, or the store does not answer)."""
    return _beat.beat_now(wait_s)


def read(store: Any, global_ranks: list[int]) -> dict[int, Life]:
    """The signs of life of ``global_ranks`` that exist, from ``store`` (the default group's)."""
    found = read_existing(store, {r: life_key(r) for r in global_ranks})
    return {r: Life.parse(v) for r, v in found.items()}


def read_existing(store: Any, keys: dict[Any, str]) -> dict[Any, bytes]:
    """The values of the keys (``{name: key}``) that exist: one request when every one does."""
    if store.check(list(keys.values())):
        return dict(zip(keys, store.multi_get(list(keys.values())), strict=True))
    return {name: store.get(key) for name, key in keys.items() if store.check([key])}
