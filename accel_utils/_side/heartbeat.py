"""The heartbeat: one background thread per lane that beats, reads alarms and makes store calls.

While this rank is inside a side-channel operation (a guard's block, a wait) for longer than
``BEAT_AFTER_S``, the thread beats: it writes this rank's :class:`~.wire.Mark` into the job's
store and reads the marks of the members it watches, its two neighbours in rank order
(everyone's, once one of them falls silent, so that a verdict names every silent member). The
waiting thread then judges from those observations alone, so it never blocks on the store
itself. A quick operation costs the thread nothing: it only looks at a field every ``POLL_S``.

The store load of a long wait is bounded per rank whatever the world size: two requests per
beat (its mark; one read of the watched marks and the lane's alarm counter), at the pace of
:func:`~.timing.beat_interval`. Whoever publishes a failure record, or needs everyone's marks
fresh (a *wake*), raises an alarm: the counter goes up, every member reads the record at its
next beat and beats fast again for ``FAST_S``. (A server-side ``wait`` would make the alarm
instant, but it holds its connection, so every lane would need one of its own, and each new
connection can stall the whole store: see :func:`~.gloo.connect_gloo`.)

Every store call runs on this thread, over the process's side connection
(:func:`~.life.connection`; a store call on a partitioned host blocks for ~15 minutes whatever
its timeout): callers wait at most a deadline and then say that the job's store is lost.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch.distributed as dist

from accel_utils._side import life
from accel_utils._side.timing import BEAT_AFTER_S, FAST_S, POLL_S, beat_interval, store_deadline
from accel_utils._side.wire import Mark, Phase, Record, mark_key
from accel_utils.errors import SideChannelError, describe
from accel_utils.topology import launcher

logger = logging.getLogger("accel_utils.side_channel")

ALARMS = "alarms"  # the lane's alarm counter


def store_lost(how: str) -> str:
    """Why no rank can be judged now: the job's store, where it is and who hosts it, is gone
    (``how``: what this rank saw of it)."""
    addr, port = launcher.get("MASTER_ADDR"), launcher.get("MASTER_PORT")
    where = f" at {addr}:{port}" if addr else ""
    host = ("torchrun's agent on the rendezvous host" if os.environ.get(
        "TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0's process (node 0)")
    return (f"lost the job's store{where}: {how}; it is hosted by {host}, which died or is "
            "unreachable from this rank. Without the store no rank's heartbeat can be read, so "
            "no rank is named")


def raise_alarm(store: Any, value: str) -> None:
    """Wake every member's pulse: ``value`` is a failure record's key, or "" (beat now)."""
    store.set(f"alarm/{store.add(ALARMS, 1)}", value)


class Pulse:
    """The heartbeat and store thread of one side channel (see the module docstring).

    Args:
        store: the lane's share of the job's store (made calls only from this thread).
        rank: this member's rank in the parent group.
        size: the number of members.
        name: for the thread's name.
        root: the job's store itself (no prefix) on the same connection, where every
            process's sign of life is (see :mod:`~accel_utils._side.life`); None: not read.
        global_ranks: each member's global rank, in group rank order (with ``root``).
    """

    def __init__(self, store: Any, rank: int, size: int, name: str, root: Any = None,
                 global_ranks: list[int] | None = None) -> None:
        self._store, self._rank, self._size, self._name = store, rank, size, name
        self._root, self._globals = root, global_ranks
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._active: tuple[int, Phase, float, float | None] | None = None
        self._count = 0
        self._last_beat = 0.0
        self._woken = -FAST_S  # when the last alarm arrived
        self._wide = False  # reading every member's mark in this operation
        self.wide_since: float | None = None  # the first reading of every member's mark
        self._busy_since: float | None = None
        self.failing_since: float | None = None  # store calls fail (DistError) since then
        self._stopped = False
        self.requests = 0  # store round trips asked for (calls and beats), for tests
        self.records: dict[str, Record] = {}  # failure records seen, by key
        self.seen: dict[int, tuple[Mark, float]] = {}  # rank -> (mark, when it last changed)
        # watched members not in the operation -> (sign of life, when it last changed)
        self.lives: dict[int, tuple[life.Life, float]] = {}

        self._watch = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
        self._alarms = 0  # alarms read so far
        self._exist: set[int] = set()  # members whose mark exists (no need to check again)
        threading.Thread(target=self._run, name=f"accel-utils-pulse-{name}", daemon=True).start()

    # ------------------------------------------------------------------ the operating thread
    def activate(self, seq: int, phase: Phase, liveness: float | None) -> None:
        """This rank entered (or, for the same ``seq``, moved on inside) operation ``seq``."""
        old = self._active
        if old is not None and old[0] == seq:  # a first rank leaving its block: say so now
            self._active = (seq, phase, old[2], liveness)
            self._last_beat = 0.0
            return
        self.seen, self.lives, self._wide, self.wide_since = {}, {}, False, None
        self._active = (seq, phase, time.monotonic(), liveness)

    def widen(self) -> None:
        """Read every member's mark from now on in this operation (a rank about to judge)."""
        if not self._wide:
            self._wide, self._last_beat = True, 0.0

    def lasted(self) -> float:
        """How long this rank has been inside the active operation (0 when none)."""
        active = self._active
        return 0.0 if active is None else time.monotonic() - active[2]

    def deactivate(self) -> None:
        self._active = None

    def stop(self) -> None:
        self._stopped = True
        self._active = None

    def call(self, fn: Callable[[Any], Any], deadline_s: float) -> Any:
        """``fn(store)`` on this thread, waiting at most ``deadline_s``.

        Raises:
            SideChannelError: the store did not answer in time (lost the job's store).
        """
        stuck = self.stuck_for()
        if stuck >= deadline_s:  # an earlier call never came back: this one would queue behind
            raise SideChannelError(store_lost(f"no answer for {stuck:.1f}s"))
        done = threading.Event()
        box: list[Any] = [None, None]

        def job() -> None:
            try:
                box[0] = fn(self._store)
                self._answered()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box[1] = exc
            done.set()

        self.requests += 1
        self._jobs.put(job)
        if not done.wait(deadline_s):
            raise SideChannelError(store_lost(f"no answer for {deadline_s:g}s"))
        error = box[1]
        if isinstance(error, dist.DistError):  # the store's connection, not the caller's request
            self._failed(error)
            raise SideChannelError(store_lost(f"it failed ({describe(error)})")) from error
        if error is not None:
            raise error
        return box[0]

    def store(self, fn: Callable[[Any], Any], liveness: float | None) -> Any:
        """``fn(store)`` on this thread, within :func:`~.timing.store_deadline` (see
        :meth:`call`)."""
        return self.call(fn, store_deadline(liveness))

    def read_lives(self, ranks: list[int], liveness: float | None) -> dict[int, life.Life]:
        """The signs of life of ``ranks`` (group ranks) that exist, read now (bounded)."""
        if self._root is None or self._globals is None:
            return {}
        members = {self._globals[r]: r for r in ranks}
        found = self.store(lambda _: life.read(self._root, list(members)), liveness)
        return {members[g]: sign for g, sign in found.items()}

    def unanswered_for(self) -> float:
        """How long the store has not answered: a call hanging, or calls failing (0: it does)."""
        failing = self.failing_since
        return max(self.stuck_for(), 0.0 if failing is None else time.monotonic() - failing)

    def stuck_for(self) -> float:
        """How long the thread's current store call has been running (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def wide_for(self) -> float:
        """How long every member's mark has been read in this operation (0: not yet)."""
        since = self.wide_since
        return 0.0 if since is None else time.monotonic() - since

    def stale(self, seq: int | None, silent_s: float) -> list[int]:
        """Members inside operation ``seq`` (any, for None) whose mark stood for ``silent_s``.

        Silence counts only while the store answers: a store that stopped answering makes
        nobody silent (it is the store that is lost, see :meth:`stuck_for`).
        """
        now = self._answering_until()
        return sorted(r for r, (mark, since) in list(self.seen.items()) if r != self._rank
                      and seq in (None, mark.seq) and now - since >= silent_s)

    def absent(self, silent_s: float | None) -> tuple[list[int], list[int]]:
        """Watched members that have not entered the operation and whose process is gone
        from this host, and those whose sign of life stood still for ``silent_s`` (None: not
        judged): dead or frozen before they arrived, not merely late."""
        lives, now = list(self.lives.items()), self._answering_until()
        gone = sorted(r for r, (sign, _) in lives if sign.gone_from_this_host())
        silent = [] if silent_s is None else sorted(
            r for r, (_, since) in lives if r not in gone and now - since >= silent_s)
        return gone, silent

    def _answering_until(self) -> float:
        """Now, or when the store stopped answering (silence after that proves nothing)."""
        failing, stuck = self.failing_since, self._busy_since
        if failing is not None:
            return failing
        if stuck is not None and time.monotonic() - stuck > 2 * POLL_S:  # a call hangs
            return stuck
        return time.monotonic()

    # --------------------------------------------------------------------- the pulse thread
    def _run(self) -> None:
        while not self._stopped:
            try:
                job = self._jobs.get(timeout=POLL_S)
            except queue.Empty:
                job = None
            self._busy_since = time.monotonic()
            try:
                if job is not None:
                    job()
                    job = None  # its closure may hold a lane (and its group): let it go now
                if self._beat():
                    self._answered()
            except dist.DistError as exc:
                self._failed(exc)
            except Exception:  # a defect here must not stop the heartbeat: say it loudly
                logger.exception("side-channel heartbeat of %s failed", self._name)
            finally:
                self._busy_since = None

    def _failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            logger.warning("side channel %s cannot reach the job's store (%s): its waits will "
                           "end with 'lost the job's store' if it does not come back",
                           self._name, describe(exc))

    def _answered(self) -> None:
        if self.failing_since is not None:
            self.failing_since = None
            logger.info("side channel %s reaches the job's store again", self._name)

    def _beat(self) -> bool:
        """Beat if it is time: write this rank's mark, read the watched ones (True if it did)."""
        active = self._active
        now = time.monotonic()
        if active is None or now - active[2] < BEAT_AFTER_S:
            return False
        seq, phase, since, liveness = active
        if now - self._last_beat < beat_interval(min(now - since, now - self._woken), liveness):
            return False
        self._last_beat = now
        self._count += 1
        self.requests += 2
        self._store.set(mark_key(self._rank), str(Mark(seq, phase, self._count)))
        wide = self._wide
        ranks = list(range(self._size)) if wide else self._watch
        if not self._exist.issuperset(ranks):
            self.requests += 2
            marks = read_marks(self._store, ranks)
            self._exist.update(marks)
            alarms = int(self._store.add(ALARMS, 0))
        else:
            values = self._store.multi_get([ALARMS, *(mark_key(r) for r in ranks)])
            alarms, marks = int(values[0]), {r: Mark.parse(v) for r, v in zip(ranks, values[1:],
                                                                               strict=True)}
        self._observe(marks)
        self._observe_lives([r for r in ranks if r not in marks or marks[r].seq < seq])
        if wide and self.wide_since is None:  # not before _observe's own clock: a member
            self.wide_since = time.monotonic()  # silent all along is stale for all of wide_for
        if alarms > self._alarms:
            self._read_alarms(alarms)
        if (liveness is not None and not self._wide
                and self.stale(seq, liveness / 4)):  # from now on, watch who else goes silent
            self._wide = True
        return True

    def _read_alarms(self, count: int) -> None:
        """File the records of alarms not read yet; beat fast again (a wake or a failure)."""
        while self._alarms < count:
            key = f"alarm/{self._alarms + 1}"
            self.requests += 1
            if not self._store.check([key]):  # its raiser has not written it yet
                return
            self.requests += 1
            record = self._store.get(key).decode()
            if record and record not in self.records:
                self.requests += 1
                self.records[record] = Record.from_json(self._store.get(record))
            self._alarms += 1
            self._woken = time.monotonic()

    def _observe_lives(self, absent: list[int]) -> None:
        """Read the signs of life of the watched members not in the operation."""
        if self._root is None or self._globals is None or not absent:
            self.lives = {}
            return
        self.requests += 1
        found = life.read(self._root, [self._globals[r] for r in absent])
        now, lives = time.monotonic(), {}
        for rank in absent:
            sign = found.get(self._globals[rank])
            if sign is not None:
                old = self.lives.get(rank)
                lives[rank] = old if old is not None and old[0] == sign else (sign, now)
        self.lives = lives

    def _observe(self, marks: dict[int, Mark]) -> None:
        now = time.monotonic()
        for rank, mark in marks.items():
            old = self.seen.get(rank)
            if old is None or old[0] != mark:
                self.seen[rank] = (mark, now)


def read_marks(store: Any, ranks: Iterable[int]) -> dict[int, Mark]:
    """The marks of ``ranks`` that exist (a member that never beat has none)."""
    found = life.read_existing(store, {r: mark_key(r) for r in ranks})
    return {r: Mark.parse(v) for r, v in found.items()}
