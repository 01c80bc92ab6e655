"""Who failed and why: a lane's failure records in the job's store, and the error they stand for.

A rank that gives up on an operation publishes a :class:`~.wire.Record` under the operation's
key (first writer wins) before anything closes; the others read it, so every rank raises the
same diagnosis. Without a record, the evidence is the members' marks: who had not arrived, whose
heartbeat stopped. The :class:`~.lane.Lane` decides when an operation failed; this module only
gathers evidence and turns it into records and exceptions, so it never raises a verdict itself.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from datetime import timedelta

from accel_utils._side.heartbeat import Pulse, raise_alarm, read_marks, store_lost
from accel_utils._side.timing import LOST_WAIT_S, POLL_S, SETTLE_S, silence_s
from accel_utils._side.wire import Failure, Mark, Order, Phase, Record, mark_key
from accel_utils.errors import (
    BarrierTimeoutError,
    FirstRankFailedError,
    RanksNotRespondingError,
    SideChannelError,
)


def _watch_all_s(liveness: float | None) -> float:
    """How long a timeout's publisher watches every member before it names the silent ones."""
    return silence_s(liveness) + POLL_S


class Diagnosis:
    """The failure evidence of one lane: records, marks, placements.

    Args:
        name: the lane's name, for messages.
        rank: this member's rank in the parent group.
        size: the number of members.
        pulse: the lane's heartbeat (every store call runs on its thread).
    """

    def __init__(self, name: str, rank: int, size: int, pulse: Pulse) -> None:
        self.name, self.rank, self.size, self.pulse = name, rank, size, pulse
        self._woken: int | None = None  # the operation whose members were last woken

    def read(self, key: str, liveness: float | None) -> Record | None:
        """The failure record under ``key``, if there is one (None also when the store is gone)."""
        try:
            found = self.pulse.store(lambda s: s.get(key) if s.check([key]) else None, liveness)
        except SideChannelError:  # the store is gone: the pulse said so, callers ask it
            return None
        return None if found is None else Record.from_json(found)

    def publish(self, key: str, record: Record, liveness: float | None) -> Record:
        """Record a failure under ``key`` (first writer wins); returns the winning record."""
        try:
            won = Record.from_json(self.pulse.store(
                lambda s: s.compare_set(key, "", record.to_json()), liveness))
            if won == record:  # the first record: tell everyone now, nobody polls for it
                self.pulse.store(lambda s: raise_alarm(s, key), liveness)
            return won
        except SideChannelError as exc:  # no record can be shared: the verdict is the store
            return Record(Failure.STORE_LOST, record.seq, self.rank, record.what,
                          message=str(exc))

    def timed_out(self, key: str, seq: int, what: str, limit: timedelta,
                  liveness: float | None) -> Record:
        """This member's timeout ran out: the record every member raises (this one's, if first)."""
        record = self.publish(key, Record(Failure.TIMEOUT, seq, self.rank, what,
                                          timeout_s=limit.total_seconds()), liveness)
        if record.kind is Failure.TIMEOUT and record.by == self.rank:
            # The publisher judges for everyone, so it needs every member's mark watched long
            # enough to tell a frozen member (its neighbours' view) from a quiet one.
            self.wake(seq, liveness)
            end = time.monotonic() + _watch_all_s(liveness)
            while self.pulse.wide_for() < silence_s(liveness) and time.monotonic() < end:
                time.sleep(0.1)
            missing, unresponsive = self.missing(seq, liveness)
            record = replace(record, missing=missing, unresponsive=unresponsive)
            self.pulse.store(lambda s: s.set(key, record.to_json()), liveness)
        return record

    def complete(self, record: Record, key: str, liveness: float | None) -> Record:
        """A timeout record with the ranks its publisher names (one diagnosis for all)."""
        end = time.monotonic() + _watch_all_s(liveness) + SETTLE_S + LOST_WAIT_S
        while record.missing is None and time.monotonic() < end:
            time.sleep(0.1)
            record = self.read(key, liveness) or record
        if record.missing is None:  # the publisher went silent: judge for ourselves
            missing, unresponsive = self.missing(record.seq, liveness)
            record = replace(record, missing=missing, unresponsive=unresponsive)
        return record

    def lost(self, key: str, seq: int, what: str, label: str, liveness: float | None,
             err: BaseException) -> Record:
        """A connection dropped: a peer's record if one comes, else who died."""
        # A peer's timeout closes its connections too: its record comes first, if it comes.
        lost_at = time.monotonic()
        self.wake(seq, liveness)  # everyone alive beats now: the silent ones are gone
        while time.monotonic() < lost_at + LOST_WAIT_S:
            found = self.read(key, liveness)
            if found is not None:
                return found
            time.sleep(0.1)
        failing = self.pulse.failing_since
        if failing is not None:  # no mark can be read: nobody can be named
            return Record(Failure.STORE_LOST, seq, self.rank, what, message=store_lost(
                f"it fails since {time.monotonic() - failing:.1f}s"))
        missing, _ = self.missing(seq, liveness)  # meanwhile the pulse watched every mark
        # Long enough to tell a silent member from a slowly beating one; and if nobody is
        # silent that long yet, one window more: the dead member's last mark may have reached
        # the store late (a set is not acknowledged), after this rank began to watch everyone.
        silence = silence_s(liveness)
        end = time.monotonic() + 2 * silence + POLL_S
        while time.monotonic() < end and (self.pulse.wide_for() < silence
                                          or not self.pulse.stale(None, silence)):
            time.sleep(0.1)
        dead = self.pulse.stale(None, silence)  # a live member has beaten since
        cause = str(err).split(". This", 1)[0]
        return self.publish(key, Record(Failure.DIED, seq, self.rank, what,
                                        message=f"lost the connection and the heartbeat ({cause})",
                                        ranks=tuple(dead), missing=missing, label=label),
                            liveness)

    def gone(self, key: str, seq: int, what: str, label: str, liveness: float | None) -> Record:
        """A watched member's process is gone: every member whose process is gone, named."""
        missing, _ = self.missing(seq, liveness)
        lives = self.pulse.read_lives(list(range(self.size)), liveness)
        dead = tuple(r for r, sign in sorted(lives.items()) if sign.gone_from_this_host())
        return self.publish(key, Record(Failure.DIED, seq, self.rank, what, ranks=dead,
                                        missing=missing, label=label,
                                        message="its process is gone from its host"), liveness)

    def post(self, seq: int, phase: Phase, liveness: float | None) -> None:
        """Write this rank's mark now (a failure path: the others are about to read marks)."""
        mark = str(Mark(seq, phase, int(time.monotonic() * 1000)))
        with contextlib.suppress(SideChannelError):  # the store is gone: the verdict says so
            self.pulse.store(lambda s: s.set(mark_key(self.rank), mark), liveness)

    def wake(self, seq: int, liveness: float | None) -> None:
        """Make every member beat now (and fast for a while); watch all of them from here.

        Once per operation ``seq``: a path that would wake again (``lost``, then ``missing``)
        would only make every member read one more alarm.
        """
        self.pulse.widen()
        if self._woken == seq:
            return
        self._woken = seq
        with contextlib.suppress(SideChannelError):  # the store is gone: nobody can be judged
            self.pulse.store(lambda s: raise_alarm(s, ""), liveness)

    def missing(self, seq: int, liveness: float | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Members that had not arrived at ``seq``, and those that arrived but went silent."""
        self.post(seq, Phase.ARRIVED, liveness)
        self.wake(seq, liveness)
        time.sleep(SETTLE_S)
        try:
            marks = self.pulse.store(lambda s: read_marks(s, range(self.size)), liveness)
        except SideChannelError:  # the store is gone: nobody can be named
            return (), ()
        missing = tuple(r for r in range(self.size) if r not in marks or marks[r].seq < seq
                        or (marks[r].seq == seq and marks[r].phase is Phase.WORKING))
        silent = tuple(r for r in self.pulse.stale(seq, silence_s(liveness)) if r not in missing)
        return missing, silent

    def placement(self, ranks: tuple[int, ...]) -> dict[int, tuple[int, int] | None]:
        """(node, local rank) of each rank, as its guards posted them (None where unknown)."""
        keys = [f"node/{r}" for r in ranks]
        try:
            raw = self.pulse.store(lambda s: {r: s.get(k) if s.check([k]) else None
                                              for r, k in zip(ranks, keys, strict=True)}, None)
        except SideChannelError:  # the store is gone: places unknown
            return {r: None for r in ranks}
        return {r: None if v is None else (int(v.split()[0]), int(v.split()[1]))
                for r, v in raw.items()}

    def nodes_of(self, ranks: tuple[int, ...]) -> dict[int, int | None]:
        return {r: None if p is None else p[0] for r, p in self.placement(ranks).items()}

    def mismatch(self, seq: int, mine: str, liveness: float | None) -> SideChannelError:
        """Members met in different calls: the error naming every member's call."""
        keys = [f"call/{seq}/{r}" for r in range(self.size)]
        self.pulse.store(lambda s: s.set(keys[self.rank], mine), liveness)
        end = time.monotonic() + 2 * LOST_WAIT_S
        while True:
            calls: dict[int, str] = self.pulse.store(
                lambda s: {r: s.get(k).decode() for r, k in enumerate(keys) if s.check([k])},
                liveness)
            if len(calls) == self.size or time.monotonic() >= end:
                break
            time.sleep(0.05)
        listed = "; ".join(f"rank {r}: {c}" for r, c in sorted(calls.items()))
        return SideChannelError(
            f"ranks made different side-channel calls on group {self.name!r} ({listed}): every "
            "rank must make the same guard / barrier calls on a group, in the same order, with "
            "the same arguments", calls)

    def error(self, record: Record) -> Exception:
        """The exception ``record`` stands for, with the nodes of the ranks it names."""
        what = record.what
        if record.kind is Failure.TIMEOUT:
            missing, silent = record.missing or (), record.unresponsive
            assert record.timeout_s is not None
            return BarrierTimeoutError(list(missing), record.timeout_s, what, list(silent),
                                       self.nodes_of(missing + silent))
        if record.kind is Failure.UNRESPONSIVE:
            assert record.liveness_s is not None
            return RanksNotRespondingError(list(record.ranks), record.liveness_s, what,
                                           self.nodes_of(record.ranks))
        if record.kind is Failure.RESOURCES:
            return SideChannelError(f"{what}: {record.message}", ranks=[record.by])
        if record.kind is Failure.CREATION:
            node = self.nodes_of((record.by,))[record.by]
            return SideChannelError(
                f"{what}: rank {record.by} (node {node}) could not create the side channel's "
                f"gloo group: {record.exc_type}: {record.message} (check GLOO_SOCKET_IFNAME and "
                "that every node can reach the others)", ranks=[record.by])
        if record.kind is Failure.STORE_LOST:
            return SideChannelError(f"{what}: {record.message}")
        if record.kind is Failure.FAILED:
            assert record.rank is not None
            return FirstRankFailedError(record.rank, record.node, record.exc_type, record.message)
        return self._died(record)

    def _died(self, record: Record) -> Exception:
        dead, missing, what = record.ranks, record.missing or (), record.what
        places = self.placement(dead)
        local_ranks = {r: p[1] for r, p in places.items() if p is not None}
        if what == "FirstRankPerNode":  # the label is the order: a dead unfinished first rank
            first = [r for r in dead if r in missing and r in local_ranks and (
                local_ranks[r] == 0 if record.label == Order.PER_NODE.value else r == 0)]
            if len(first) == 1:
                others = [r for r in dead if r != first[0]]
                return FirstRankFailedError(
                    first[0], self.nodes_of((first[0],))[first[0]], "died",
                    f"its process is gone: {record.message}"
                    f"{f'; rank(s) {others} are gone too' if others else ''}")
        nodes = self.nodes_of(dead)
        where = ", ".join(f"rank {r}" + ("" if nodes[r] is None else f" (node {nodes[r]})")
                          for r in dead)
        if dead:
            return SideChannelError(f"{what}: {where} died: {record.message}", ranks=list(dead))
        return SideChannelError(f"{what}: lost the connection to a peer ({record.message}); no "
                                f"rank could be named (ranks that had not arrived: "
                                f"{list(missing)})", ranks=list(missing))
