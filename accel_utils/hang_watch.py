"""HangWatch: a stalled training loop names its stuck ranks, their step, phase and line.

A thread per rank compares the time since the main thread last made progress (``step()`` or
``phase()``, plain attribute writes) with the stall limit; nothing on the training path touches
the store or makes a collective. Progress also rides on this process's sign of life (one store
write every few seconds that the process makes anyway, see :mod:`accel_utils._side.life`), so a
rank that cannot report is still placed. When the limit passes, every rank writes a short
report (its step, phase and main-thread stack) through the side channel's store connection,
and the reporters (rank 0 and every node's local rank 0) log one table
(:func:`~accel_utils.hang_report.stall_table`).

A thread cannot interrupt a C++ collective, so ``on_stall="raise"`` raises :class:`StallError`
in the main thread (delivered when it next runs Python, wherever it is: a ``with`` block or a
Trainer's loop) and, if it has not left the watch
``RAISE_GRACE_S`` later, ends the process with exit code 1, as ``"exit"`` does at once; every
rank waits (bounded) for a reporter's table first, so a launcher that stops the job when one
process exits does not cut the report off.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import itertools
import logging
import os
import socket
import statistics
import threading
import time
from collections import deque
from datetime import timedelta
from types import TracebackType
from typing import Any

from accel_utils._side import life
from accel_utils._side.timing import absent_silence_s, as_timeout
from accel_utils.errors import SideChannelError, StallError
from accel_utils.hang_report import RankReport, judge_silent, stall_table, where_now
from accel_utils.topology import launcher

logger = logging.getLogger("accel_utils.hang_watch")

SLOW_FACTOR = 10.0  # no progress for this many typical steps is a stall (if over ``stall``)
RAISE_GRACE_S = 5.0  # "raise": how long the main thread has to leave the watch
LEAVE_WAIT_S = 10.0  # how long rank 0 waits for the others to end before it ends
_watches: dict[str, int] = {}  # group name -> watches entered on it (the same on every rank)


class OnStall(str, enum.Enum):
    """What a watch does once it has reported a stall."""

    REPORT = "report"  # log, keep waiting, report again at twice, four times ... the limit
    RAISE = "raise"  # StallError in the main thread; the process ends if it cannot be raised
    EXIT = "exit"  # end the process with exit code 1


class HangWatch:
    """Watch a training loop; when it stops making progress, say which ranks and where.

    Example::

        with HangWatch(accelerator, stall=60) as watch:
            for batch in loader:
                watch.step()  # or watch.step("data") and watch.phase("forward") ...
                ...

    Args:
        group: an ``Accelerator``, ``PartialState``, process group, device mesh or None (the
            default group): its ranks are watched, and each needs a watch of its own.
        stall: seconds without progress that make a stall, once a step has completed: the
            limit is the larger of ``stall`` and ``SLOW_FACTOR`` times the median step time of
            the last 16 steps, so slow steps are not stalls.
        liveness: seconds a silent rank's sign of life must stand still to be named not
            responding (never less than two of its beats).
        warmup: the limit until the first step completes (compilation, warm-up); default
            ``10 * stall``.
        on_stall: ``"report"``, ``"raise"`` or ``"exit"`` (see :class:`OnStall`).

    Raises:
        ValueError: a limit that is not a positive number of seconds, or an unknown
            ``on_stall``.
    """

    def __init__(self, group: Any = None, *, stall: float | timedelta = 60.0,
                 liveness: float | timedelta = 30.0, warmup: float | timedelta | None = None,
                 on_stall: str | OnStall = "report") -> None:
        self.stall = as_timeout(stall, "stall").total_seconds()
        self.liveness = as_timeout(liveness, "liveness").total_seconds()
        self.warmup = (10 * self.stall if warmup is None
                       else as_timeout(warmup, "warmup").total_seconds())
        try:
            self.on_stall = OnStall(on_stall)
        except ValueError:
            raise ValueError(f"HangWatch(on_stall={on_stall!r}): expected one of "
                             f"{[o.value for o in OnStall]}") from None
        self._handle = group
        self._starts: deque[float] = deque(maxlen=17)
        self._moved = 0.0
        self._stop, self._left = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._lane: Any = None
        self.reports = 0  # stalls this rank has reported on
        self.last_report = ""  # the last table this rank logged ("" if it is no reporter)
        self._odd: list[int] = []  # the ranks that table names
        self._absent = 0  # ranks it found dead, frozen or gone: they will not count out
        self._ending = False

    # ------------------------------------------------------------------ the training thread
    def step(self, phase: str = "step") -> None:
        """A new step begins (in ``phase``): progress. A local write, no store, no collective."""
        progress = life.PROGRESS
        progress.step += 1
        progress.phase = phase
        self._moved = now = time.monotonic()
        self._starts.append(now)

    def phase(self, name: str) -> None:
        """The current step enters phase ``name`` ("data", "forward", "eval" ...): progress."""
        life.PROGRESS.phase = name
        self._moved = time.monotonic()

    def __enter__(self) -> HangWatch:
        from accel_utils._side import lane_for
        from accel_utils.topology import resolve

        topo = resolve(self._handle)
        self._rank, self._size = topo.rank, topo.world_size
        if topo.group is not None:
            name = topo.group.group_name
            _watches[name] = _watches.get(name, 0) + 1
            self._prefix = f"hang/{_watches[name]}/"
            self._group, self._lane = topo.group, lane_for(topo.group, purpose="hang-watch")
        self._reporter = self._rank == 0 or launcher.get_int("LOCAL_RANK") == 0
        node = launcher.get_int("GROUP_RANK")
        progress = life.PROGRESS
        progress.node, progress.step, progress.phase = -1 if node is None else node, 0, "start"
        self._moved, self._main = time.monotonic(), threading.get_ident()
        if self._lane is not None and not life.beat_now(min(self.liveness, 5.0)):
            logger.warning("HangWatch: rank %d could not write its sign of life into the job's "
                           "store: a stall report may not place it", self._rank)
        self._stop.clear()
        self._left.clear()
        self._thread = threading.Thread(target=self._run, name="accel-utils-hang-watch",
                                         daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._left.set()
        self._stop.set()
        life.PROGRESS.step, life.PROGRESS.phase = -1, "-"
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        if self._lane is not None:
            if exc is not None and not isinstance(exc, StallError) and not self._ending:
                self._post_mortem(exc)
            if not (thread and thread.is_alive()):  # else it still reports through the lane
                from accel_utils._side import close

                close(self._group, "hang-watch")
                self._lane = None

    # ---------------------------------------------------------------------- the watch thread
    def _limit(self) -> float:
        starts = list(self._starts)
        if len(starts) < 2:
            return max(self.warmup, self.stall)
        typical = statistics.median(b - a for a, b in itertools.pairwise(starts))
        return max(self.stall, SLOW_FACTOR * typical)

    def _run(self) -> None:
        tick = min(1.0, self.stall / 4)
        moved, episodes, held = self._moved, 0, 0.0
        due = time.monotonic() + tick
        while not self._stop.wait(max(due - time.monotonic(), 0.0)):
            now = time.monotonic()
            if self._moved != moved:  # progress again: a new quiet period
                if episodes:
                    self._withdraw()
                moved, episodes, held = self._moved, 0, 0.0
            held, due = max(held, now - due), now + tick  # late: the GIL was held
            if now - moved < self._limit() * 2 ** episodes:  # again at 2x, 4x ... the limit
                continue
            episodes += 1
            try:
                self._stalled(now - moved, held, tick, episodes)
            except Exception:  # a defect must not end the watch silently
                logger.exception("HangWatch could not report a stall")
            due = time.monotonic() + tick
            if self.on_stall is not OnStall.REPORT:
                self._end()
                return

    def _stalled(self, quiet: float, held: float, tick: float, episode: int) -> None:
        progress = life.PROGRESS
        where, spot = where_now(self._main)
        mine = RankReport(self._rank, progress.node, socket.gethostname(), progress.step,
                          progress.phase, round(quiet, 1), where, spot, round(held, 1))
        self.reports += 1
        if self._lane is None:  # one process: its own report is the table
            self._log(*stall_table({self._rank: mine}, [], self._limit()))
            return
        try:
            self._lane.pulse.store(lambda s: s.set(self._prefix + str(self._rank),
                                                   mine.to_json()), self.liveness)
            # a rank that sees no reporter's table in time reports itself (its reporter froze)
            if self._reporter or not self._await_report(tick, episode):
                self._report(mine, tick, episode)
        except SideChannelError as exc:  # the store is lost: what this rank knows of itself
            self._log(*stall_table({self._rank: mine}, [], self._limit()))
            logger.error("HangWatch on rank %d cannot read the other ranks: %s", self._rank, exc)

    def _report(self, mine: RankReport, tick: float, episode: int) -> None:
        """Collect every rank's report (or judge its silence) and log the table."""
        pulse, ranks = self._lane.pulse, list(range(self._size))
        keys = {r: self._prefix + str(r) for r in ranks if r != self._rank}
        first = pulse.read_lives(ranks, self.liveness)
        since, window = time.monotonic(), absent_silence_s(self.liveness)
        settle = min(max(2.0, 2 * tick), self.stall)
        while True:
            self._stop.wait(tick)
            found = pulse.store(lambda s: life.read_existing(s, keys), self.liveness)
            reports = {r: RankReport.from_json(v) for r, v in found.items()}
            reports[self._rank] = mine
            missing = [r for r in ranks if r not in reports]
            lives = pulse.read_lives(missing, self.liveness)
            waited = time.monotonic() - since
            silent = [judge_silent(r, lives.get(r), first.get(r), waited) for r in missing]
            if waited >= window or (waited >= settle and all(
                    s.verdict in ("died", "moving", "left") for s in silent)):
                break
        self._absent = sum(s.verdict != "moving" for s in silent)
        self._log(*stall_table(reports, silent, self._limit()))
        pulse.store(lambda s: s.set(f"{self._prefix}reported/{episode}", ""), self.liveness)

    def _await_report(self, tick: float, episode: int) -> bool:
        """Whether a reporter logged its table in time (a bounded wait)."""
        key, pulse = f"{self._prefix}reported/{episode}", self._lane.pulse
        deadline = time.monotonic() + absent_silence_s(self.liveness) + 2 * self.stall + 5
        while not pulse.store(lambda s: s.check([key]), self.liveness):
            if time.monotonic() > deadline or self._stop.wait(tick):
                return False
        return True

    def _withdraw(self) -> None:
        """Progress again after a report: take this rank's report back (best effort)."""
        if self._lane is not None:
            key = self._prefix + str(self._rank)
            with contextlib.suppress(SideChannelError):
                self._lane.pulse.store(lambda s: s.delete_key(key), self.liveness)
        logger.info("HangWatch: rank %d makes progress again", self._rank)

    def _leave(self) -> None:
        """Before this process ends: count it out; rank 0, whose process may host the job's
        store, waits (bounded) for the others, so that none loses the store mid-report."""
        if self._lane is None:
            return
        key, pulse = self._prefix + "leaving", self._lane.pulse
        try:
            left = pulse.store(lambda s: s.add(key, 1), self.liveness)
            deadline = time.monotonic() + LEAVE_WAIT_S
            expected = self._size - self._absent
            while self._rank == 0 and left < expected and time.monotonic() < deadline:
                time.sleep(0.2)
                left = pulse.store(lambda s: s.add(key, 0), self.liveness)
        except SideChannelError:
            pass

    def _post_mortem(self, exc: BaseException) -> None:
        """The loop failed (a collective's "connection closed" names no rank): name the ranks
        whose process is gone from this host, from their signs of life (one bounded read)."""
        try:
            lives = self._lane.pulse.read_lives(list(range(self._size)), self.liveness)
        except SideChannelError:
            return
        gone = sorted(r for r, sign in lives.items() if sign.gone_from_this_host())
        if gone:
            logger.error("HangWatch: rank %d leaves the watch with %s: %s; %s died (its process "
                         "is gone)", self._rank, type(exc).__name__, str(exc)[:200],
                         ", ".join(f"rank {r} (node {lives[r].node})" for r in gone))

    def _log(self, text: str, odd: list[int]) -> None:
        self.last_report, self._odd = text, odd
        (logger.warning if self.on_stall is OnStall.REPORT else logger.error)(text)

    def _end(self) -> None:
        """Raise in the main thread, or end the process (see the module docstring)."""
        self._ending = True  # from here, collectives fail because ranks end: no post-mortem
        progress = life.PROGRESS
        message = self.last_report or (
            f"HangWatch: rank {self._rank} made no progress at step {progress.step} "
            f"({progress.phase}); the table of every rank is in the log of rank 0 and of each "
            "node's local rank 0")
        if self.on_stall is OnStall.RAISE and not self._left.is_set():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self._main),
                ctypes.py_object(_stall_error(message, self._odd)))
            if self._left.wait(RAISE_GRACE_S):
                return
            why = (f"its main thread did not leave the watch within {RAISE_GRACE_S:g} s (it is "
                   "inside a call Python cannot interrupt, such as a collective)")
        else:
            why = f"on_stall={self.on_stall.value!r}"
        logger.critical("HangWatch ends rank %d with exit code 1: %s", self._rank, why)
        self._leave()
        for handler in logging.getLogger().handlers + logging.getLogger("accel_utils").handlers:
            handler.flush()
        os._exit(1)


def _stall_error(message: str, ranks: list[int]) -> type[StallError]:
    """A StallError class that builds itself with ``message``: an exception raised in another
    thread is given as a class, instantiated without arguments where it lands."""

    def init(self: StallError) -> None:
        StallError.__init__(self, message, ranks)

    def reduce(self: StallError) -> tuple[Any, tuple[Any, ...]]:
        return StallError, self._args

    return type("StallError", (StallError,), {"__init__": init, "__reduce__": reduce,
                                              "__module__": StallError.__module__})
