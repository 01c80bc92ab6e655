"""Who failed and why: a lane's failure records in the job's store, and what they mean.

The failure half of :class:`~accel_utils.side_channel.Lane`. A rank that gives up on an
operation publishes a record under the operation's key (first writer wins) before anything
closes; the others read it, so every rank raises the same diagnosis. Without a record, the
evidence is the members' marks: who had not arrived, whose heartbeat stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

from accel_utils._pulse import POLL_S, Mark, Pulse, mark_key, raise_alarm, read_marks, silence_s
from accel_utils.errors import (
    BarrierTimeoutError,
    FirstRankFailedError,
    RanksNotRespondingError,
    SideChannelError,
)

logger = logging.getLogger(__name__)

_SETTLE_S = POLL_S + 0.3  # on a failure: time for every arrived member to post its mark
_LOST_WAIT_S = 1.0  # after a lost connection: how long a failure record may take to appear
_STORE_S = 30.0  # how long a failure path waits for the store when liveness is off
_STORE_MIN_S = 10.0  # a busy store host may stall a request for seconds: not a lost store


def store_deadline(liveness: float | None) -> float:
    """How long a store request may take before the job's store counts as lost."""
    return _STORE_S if liveness is None else max(liveness, _STORE_MIN_S)


class Diagnoses:
    """Failure records and evidence for a lane (mixed into ``Lane``, which owns the state)."""

    name: str
    rank: int
    size: int
    pulse: Pulse
    label: str
    memo: dict[str, Any]

    def record_key(self, seq: int) -> str:
        raise NotImplementedError

    def fail(self, record: dict[str, Any], cause: BaseException | None = None,
             liveness: float | None = None) -> NoReturn:
        raise NotImplementedError

    def store(self, fn: Callable[[Any], Any], liveness: float | None) -> Any:
        """``fn(store)``, bounded (see :meth:`Pulse.call`)."""
        return self.pulse.call(fn, store_deadline(liveness))

    def read(self, key: str, liveness: float | None) -> dict[str, Any] | None:
        """The failure record under ``key``, if there is one (None also when the store is gone)."""
        try:
            found = self.store(lambda s: s.get(key) if s.check([key]) else None, liveness)
        except Exception:
            logger.debug("could not read a failure record", exc_info=True)
            return None
        return None if found is None else json.loads(found)

    def publish(self, seq: int, record: dict[str, Any], liveness: float | None) -> dict[str, Any]:
        """Record operation ``seq``'s failure (first writer wins); returns the winning record."""
        record = {**record, "seq": seq, "by": self.rank}
        key = self.record_key(seq)
        try:
            won = dict(json.loads(self.store(
                lambda s: s.compare_set(key, "", json.dumps(record)), liveness)))
            if won == record:  # the first record: tell everyone now, nobody polls for it
                self.store(lambda s: raise_alarm(s, key), liveness)
            return won
        except Exception:
            logger.debug("could not publish a side-channel failure record", exc_info=True)
            return record

    def _timed_out(self, seq: int, what: str, limit: timedelta, liveness: float | None,
                   err: BaseException | None) -> NoReturn:
        record = self.publish(seq, {"kind": "timeout", "timeout_s": limit.total_seconds(),
                                    "what": what}, liveness)
        if record["kind"] == "timeout" and record["by"] == self.rank:
            missing, unresponsive = self.missing(seq, liveness)
            record.update(missing=missing, unresponsive=unresponsive)
            self.store(lambda s: s.set(self.record_key(seq), json.dumps(record)), liveness)
        self.fail(record, err, liveness)

    def _complete(self, record: dict[str, Any], key: str,
                  liveness: float | None) -> dict[str, Any]:
        """A timeout record with the ranks its publisher names (one diagnosis for all)."""
        end = time.monotonic() + _SETTLE_S + _LOST_WAIT_S
        while "missing" not in record and time.monotonic() < end:
            time.sleep(0.1)
            record = self.read(key, liveness) or record
        if "missing" not in record:  # the publisher went silent: judge for ourselves
            missing, unresponsive = self.missing(record["seq"], liveness)
            record = {**record, "missing": missing, "unresponsive": unresponsive}
        return record

    def _lost(self, seq: int, what: str, liveness: float | None, err: BaseException) -> NoReturn:
        # A peer's timeout closes its connections too: its record comes first, if it comes.
        key, lost_at = self.record_key(seq), time.monotonic()
        self.wake(seq, liveness)  # everyone alive beats now: the silent ones are gone
        end = lost_at + _LOST_WAIT_S
        while time.monotonic() < end:
            found = self.read(key, liveness)
            if found is not None:
                self.fail(found, err, liveness)
            time.sleep(0.1)
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
        self.fail(self.publish(seq, {"kind": "died", "ranks": dead, "missing": missing,
                                     "what": what, "label": self.label,
                                     "message": str(err).split(". This", 1)[0]}, liveness), err)

    def post(self, seq: int, phase: str, liveness: float | None) -> None:
        """Write this rank's mark now (a failure path: the others are about to read marks)."""
        mark = str(Mark(seq, phase, int(time.monotonic() * 1000)))
        try:
            self.store(lambda s: s.set(mark_key(self.rank), mark), liveness)
        except Exception:
            logger.debug("could not post a mark", exc_info=True)

    def wake(self, seq: int, liveness: float | None) -> None:
        """Make every member beat now (and fast for a while); watch all of them from here.

        Once per operation ``seq``: a path that would wake again (``_lost``, then ``missing``)
        would only make every member read one more alarm.
        """
        self.pulse.widen()
        if self.memo.get("woken") == seq:
            return
        self.memo["woken"] = seq
        try:
            self.store(lambda s: raise_alarm(s, ""), liveness)
        except Exception:
            logger.debug("could not wake the other members", exc_info=True)

    def missing(self, seq: int, liveness: float | None) -> tuple[list[int], list[int]]:
        """Members that had not arrived at ``seq``, and those that arrived but went silent."""
        self.post(seq, "a", liveness)
        self.wake(seq, liveness)
        time.sleep(_SETTLE_S)
        try:
            marks = self.store(lambda s: read_marks(s, range(self.size)), liveness)
        except Exception:  # noqa: BLE001 - the store is gone: nobody can be named
            return [], []
        missing = [r for r in range(self.size) if r not in marks or marks[r].seq < seq
                   or (marks[r].seq == seq and marks[r].phase == "w")]
        silent = [r for r in self.pulse.stale(seq, silence_s(liveness)) if r not in missing]
        return missing, silent

    def placement(self, ranks: list[int]) -> dict[int, tuple[int, int] | None]:
        """(node, local rank) of each rank, as its guards posted them (None where unknown)."""
        keys = [f"node/{r}" for r in ranks]
        try:
            raw = self.store(lambda s: {r: s.get(k) if s.check([k]) else None
                                        for r, k in zip(ranks, keys, strict=True)}, None)
        except Exception:  # noqa: BLE001 - the store is gone
            return {r: None for r in ranks}
        return {r: None if v is None else (int(v.split()[0]), int(v.split()[1]))
                for r, v in raw.items()}

    def nodes_of(self, ranks: list[int]) -> dict[int, int | None]:
        return {r: None if p is None else p[0] for r, p in self.placement(ranks).items()}

    def _mismatch(self, seq: int, mine: str, liveness: float | None) -> NoReturn:
        keys = [f"call/{seq}/{r}" for r in range(self.size)]
        self.store(lambda s: s.set(keys[self.rank], mine), liveness)
        end = time.monotonic() + 2 * _LOST_WAIT_S
        calls: dict[int, str] = {}
        while time.monotonic() < end and len(calls) < self.size:
            calls = self.store(lambda s: {r: s.get(k).decode() for r, k in enumerate(keys)
                                          if s.check([k])}, liveness)
            time.sleep(0.1)
        listed = "; ".join(f"rank {r}: {c}" for r, c in sorted(calls.items()))
        raise SideChannelError(
            f"ranks made different side-channel calls on group {self.name!r} ({listed}): every "
            "rank must make the same guard / barrier calls on a group, in the same order, with "
            "the same arguments", calls)


def error_from(record: dict[str, Any], lane: Diagnoses) -> Exception:
    """The exception a failure record stands for, with the nodes of the ranks it names."""
    what, kind = record.get("what", "barrier"), record["kind"]
    if kind == "timeout":
        missing, silent = record.get("missing", []), record.get("unresponsive", [])
        return BarrierTimeoutError(missing, record["timeout_s"], what, silent,
                                   lane.nodes_of(missing + silent))
    if kind == "unresponsive":
        return RanksNotRespondingError(record["ranks"], record["liveness_s"], what,
                                       lane.nodes_of(record["ranks"]))
    if kind == "resources":
        return SideChannelError(f"{what}: {record['message']}", ranks=[record["rank"]])
    if kind == "failed":
        return FirstRankFailedError(record["rank"], record["node"], record["exc_type"],
                                    record["message"])
    dead, places = record["ranks"], lane.placement(record["ranks"])
    local_ranks = {r: p[1] for r, p in places.items() if p is not None}
    if what == "FirstRankPerNode":  # the label is the order: a dead unfinished first rank
        first = [r for r in dead if r in record["missing"] and r in local_ranks and (
            local_ranks[r] == 0 if record.get("label") == "local" else r == 0)]
        if len(first) == 1:
            others = [r for r in dead if r != first[0]]
            return FirstRankFailedError(
                first[0], lane.nodes_of(first)[first[0]], "died",
                f"its process is gone (lost the connection, its heartbeat stopped"
                f"{f'; rank(s) {others} are gone too' if others else ''}): {record['message']}")
    nodes = lane.nodes_of(dead)
    where = ", ".join(f"rank {r} (node {nodes[r]})" for r in dead)
    if dead:
        return SideChannelError(f"{what}: {where} died: lost the connection and the heartbeat "
                                f"({record['message']})", ranks=dead)
    return SideChannelError(f"{what}: lost the connection to a peer ({record['message']}); no "
                            f"rank could be named (ranks that had not arrived: "
                            f"{record['missing']})", ranks=record["missing"])
