"""The side channel: one gloo group per parent group (and thread), and the protocol over it.

Every guard, barrier and probe is an *operation* on its parent group's lane. Each member numbers
the operations it enters, so all members agree on the number ``seq`` of every call, failed ones
included. An operation is one all-reduce (bitwise OR) of one int64 word that carries the call's
identity (kind, label, ``seq``) twice, once inverted: any two members in different calls leave
a bit set in both halves, so a mismatch raises on every rank instead of pairing the wrong calls.

The gloo group is created by the first operation that needs it, under a store prefix named
after that operation, and is never reused after a failure: every member that fails an
operation (or learns of a failure through the store) parks its group, and the next operation
builds a fresh one under its own ``seq``, so every member lands on the same prefix again.
Parked groups are kept alive by a daemon thread, never destroyed: a gloo group's destructor
waits for its pending operations, which would keep a failing rank from raising or exiting.

A failure is published as a record in the job's store (first writer wins) *before* this rank
gives up on the group; a rank that sees a connection drop reads the records first and waits a
moment for one, so a peer's timeout is never mistaken for a death. While an operation lasts
longer than ``POLL_S``, :class:`~accel_utils._pulse.Pulse` beats and watches the others' beats.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from numbers import Real
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore

from accel_utils._diagnosis import Diagnoses, error_from, store_deadline
from accel_utils._gloo import (
    connect_gloo,
    descriptors_short,
    finished,
    park,
    set_timeout,
)
from accel_utils._gloo import parked_count as parked_count  # part of this module's interface
from accel_utils._identity_cache import IdentityCache
from accel_utils._pulse import POLL_S, Mark, Pulse, mark_key
from accel_utils.errors import SideChannelError

logger = logging.getLogger(__name__)

MAX_TIMEOUT = timedelta(days=30)  # longer ones overflow gloo's clock arithmetic: clamped
DEFAULT_LIVENESS = 30.0  # seconds without a heartbeat before a member is named unresponsive
_GRACE_S = 0.5  # our deadline trails gloo's timeout, so that gloo ends the operation itself
_KINDS = {"create": 1, "barrier": 2, "guard": 3, "log": 4, "probe": 5}
FAILED_BIT = 1 << 62
CONFIRM_BIT = 1 << 61
PAYLOAD_BITS = 30


def as_timeout(value: Any, name: str = "timeout") -> timedelta:
    """A positive ``timedelta`` (at most 30 days) from a ``timedelta`` or seconds."""
    if isinstance(value, bool) or not isinstance(value, (timedelta, Real)):
        raise TypeError(f"{name} must be a datetime.timedelta or seconds; got {value!r}")
    if isinstance(value, timedelta):
        limit = value
    else:
        limit = timedelta(seconds=min(float(value), MAX_TIMEOUT.total_seconds()))
    if limit.total_seconds() <= 0:
        raise ValueError(f"{name} must be positive; got {limit}")
    if limit > MAX_TIMEOUT:
        logger.debug("%s %s clamped to %s", name, limit, MAX_TIMEOUT)
    return min(limit, MAX_TIMEOUT)


def as_liveness(value: Any) -> float | None:
    """Seconds of heartbeat silence that name a member unresponsive; None turns it off."""
    return None if value is None else as_timeout(value, "liveness").total_seconds()


class _Regroup(Exception):
    """The group failed under an earlier operation this member saw succeed: rebuild, retry."""


@dataclass(eq=False)
class Lane(Diagnoses):
    """One parent group's side channel as seen by one thread of this process."""

    name: str
    rank: int  # within the parent group
    size: int
    ranks: frozenset[int]  # the members' global ranks, to tell overlapping groups apart
    base: Any  # the lane's share of the job's store (a PrefixStore)
    pulse: Pulse
    seq: int = 0  # operations entered; every member enters the same ones in the same order
    group: Any = None  # the current gloo group, None until (re)created
    gen: int = 0  # the seq whose prefix the current group was created under
    timeout: timedelta | None = None  # the gloo group's current timeout
    work: Any = None  # the operation in flight, parked with the group on a failure
    label: str = ""  # the current operation's label (a guard's order)
    memo: dict[str, Any] = field(default_factory=dict)  # per-lane facts (probes, node posted)

    def post_place(self, node: int, local_rank: int, liveness: float | None) -> None:
        """Once per lane: this rank's node and local rank, so survivors can name its node."""
        if not self.memo.get("place"):
            key, value = f"node/{self.rank}", f"{node} {local_rank}"  # no reference to self
            self.store(lambda s: s.set(key, value), liveness)
            self.memo["place"] = True

    def begin(self) -> int:
        """Enter the next operation; returns its number (the same on every member)."""
        self.seq += 1
        return self.seq

    def record_key(self, seq: int) -> str:
        return f"fail/{self.gen if self.group is not None else seq}"

    # ------------------------------------------------------------------------ operations
    def run(self, seq: int, kind: str, label: str, what: str, limit: timedelta,
            liveness: float | None, payload: int = 0, failed: bool = False,
            wait: bool = True) -> int:
        """Operation ``seq``: the OR of every member's ``payload`` (and the failure bit).

        With ``wait=False`` this member only contributes (a failing rank that must not wait),
        then parks the group. Raises on every failure, naming who and why (see the module).
        """
        self.label = label
        self.pulse.activate(seq, "a", liveness)
        # A member inside this operation for a while asks for a second round: a peer that
        # died or froze after its share went through must not let some members pass.
        word = _encode(seq, kind, label, payload, failed, self.pulse.lasted() > POLL_S)
        try:
            while True:
                try:
                    tensor = self._start(seq, word, what, limit, liveness)
                    if not wait:
                        self.abandon()
                        return 0
                    deadline = time.monotonic() + limit.total_seconds() + _GRACE_S
                    self._watch(finished(self.work), seq, what, deadline, limit, liveness)
                    if int(tensor.item()) & CONFIRM_BIT:
                        self._start(seq, word, what, limit, liveness)
                        self._watch(finished(self.work), seq, what, deadline, limit, liveness)
                    break
                except _Regroup:
                    logger.warning("%s: the side channel failed under an earlier call; "
                                   "rebuilding it for call %d", what, seq)
                    self.abandon()
        finally:
            self.pulse.deactivate()
        self.work = None
        result = int(tensor.item())
        if (result & 0xFFFF) & (result >> 16 & 0xFFFF):
            self._mismatch(seq, f"{what}{label and f' {label!r}'} (call {seq})", liveness)
        return result

    def _start(self, seq: int, word: int, what: str, limit: timedelta,
               liveness: float | None) -> torch.Tensor:
        if self.group is None:
            self._create(seq, what, limit, liveness)
        if self.timeout != limit:  # else a wait that gave up would leave its operation pending
            set_timeout(self.group, limit)
            self.timeout = limit
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.BOR  # type: ignore[assignment]  # stubs: RedOpType
        tensor = torch.tensor([word], dtype=torch.int64)
        self.work = self.group.allreduce([tensor], opts)
        return tensor

    def connect(self, seq: int, what: str, limit: timedelta, liveness: float | None) -> None:
        """Create the gloo group under operation ``seq``'s prefix (collective over members)."""
        self.pulse.activate(seq, "a", liveness)
        try:
            self._create(seq, what, limit, liveness)
        finally:
            self.pulse.deactivate()

    def _create(self, seq: int, what: str, limit: timedelta, liveness: float | None) -> None:
        box: dict[str, Any] = {}
        base, rank, size = self.base, self.rank, self.size
        short = descriptors_short(rank)
        if short:  # a clear error on every member, not a socket error on one
            self.fail(self.publish(seq, {"kind": "resources", "rank": rank, "message": short,
                                         "what": what}, liveness))

        def build() -> None:  # on its own connection: a rendezvous blocks its store client
            try:
                store = PrefixStore(f"g{seq}", base.clone() if hasattr(base, "clone")
                                         else base)
                box["group"] = connect_gloo(store, rank, size, limit)
            except Exception as exc:  # noqa: BLE001 - reported by the watching thread
                box["error"] = exc

        self.gen = seq
        thread = threading.Thread(target=build, name="accel-utils-connect", daemon=True)
        thread.start()

        def built(slice_: timedelta) -> bool:
            thread.join(slice_.total_seconds())
            if thread.is_alive():
                return False
            if "error" in box:
                if "Too many open files" in str(box["error"]):
                    self.fail(self.publish(seq, {  # gloo ran out: ask for room for several
                        "kind": "resources", "rank": rank, "what": what,
                        "message": descriptors_short(rank, need=64)}, liveness))
                raise RuntimeError(f"Timed out creating the gloo side group: {box['error']}")
            return True

        deadline = time.monotonic() + limit.total_seconds() + _GRACE_S
        try:
            self._watch(built, seq, what, deadline, limit, liveness)
        except BaseException:
            park(thread, box)  # it may still connect later: never free that group
            raise
        self.group, self.timeout = box["group"], limit
        logger.debug("created gloo side group g%d for %s", seq, self.name)

    def _watch(self, done: Callable[[timedelta], Any], seq: int, what: str,
               deadline: float, limit: timedelta, liveness: float | None) -> None:
        """Wait until ``done(slice)`` is true, judging the others every ``POLL_S``."""
        while True:
            left = deadline - time.monotonic()
            step = max(min(POLL_S, left), 0.001)
            try:
                if done(timedelta(seconds=step)) is not False:
                    return
            except SideChannelError:  # already a verdict
                raise
            except RuntimeError as err:  # gloo's verdict: our timeout, or a lost peer
                if "Timed out" in str(err) or "timeout" in str(err):
                    self._timed_out(seq, what, limit, liveness, err)
                self._lost(seq, what, liveness, err)
            if left <= 0:
                self._timed_out(seq, what, limit, liveness, None)
            self._judge(seq, what, liveness)

    def _judge(self, seq: int, what: str, liveness: float | None) -> None:
        record = self.pulse.records.get(self.record_key(seq))
        if record is not None:
            if record["seq"] < seq:
                raise _Regroup
            self.fail(record, liveness=liveness)
        if liveness is None:
            return
        patience = store_deadline(liveness)
        if self.pulse.stuck_for() > patience:
            self.abandon()
            raise SideChannelError(f"{what}: lost the job's store: no answer for {patience:g}s "
                                   "(its host is down or unreachable from this rank)")
        if not self.pulse.stale(seq, liveness):
            return
        window = max(liveness / 2, 3 * POLL_S)  # name every member silent that long, not one
        self.pulse.widen()
        if self.pulse.wide_for() >= window:
            stale = self.pulse.stale(seq, window)
            self.fail(self.publish(seq, {"kind": "unresponsive", "ranks": stale,
                                         "liveness_s": liveness, "what": what}, liveness))

    def abandon(self) -> None:
        """Stop using the group (it may hold a pending operation): park it, build anew later."""
        if self.group is not None:
            park(self.group, self.work)
        self.group, self.work, self.timeout = None, None, None

    def fail(self, record: dict[str, Any], cause: BaseException | None = None,
             liveness: float | None = None) -> NoReturn:
        """Abandon the group and raise the error that ``record`` describes."""
        key = self.record_key(record["seq"])
        self.abandon()
        if record["kind"] == "timeout":
            record = self._complete(record, key, liveness)
        raise error_from(record, self) from cause


def _encode(seq: int, kind: str, label: str, payload: int, failed: bool, confirm: bool) -> int:
    tag = _KINDS[kind] | (zlib.crc32(label.encode()) & 0x1F) << 3 | (seq & 0xFF) << 8
    if not 0 <= payload < 1 << PAYLOAD_BITS:
        raise ValueError(f"payload must fit in {PAYLOAD_BITS} bits; got {payload}")
    return (tag | (~tag & 0xFFFF) << 16 | payload << 32 | (FAILED_BIT if failed else 0)
            | (CONFIRM_BIT if confirm else 0))


def payload_of(word: int) -> int:
    return word >> 32 & ((1 << PAYLOAD_BITS) - 1)


# ----------------------------------------------------------------------------------- lanes
_lanes = IdentityCache()  # parent group -> {thread name: Lane}; entries die with their parent
_DEFAULT_THREAD_NAME = re.compile(r"Thread-\d+( \(.*\))?$|ThreadPoolExecutor-\d+_\d+$")


def lane_for(parent: dist.ProcessGroup) -> Lane:
    """This thread's lane on ``parent`` (created on first use; no collective, no waiting).

    Threads other than the main one get lanes of their own, matched across ranks by thread
    name: a guard in thread "loader" on one rank pairs with thread "loader" on the others.
    """
    thread = threading.current_thread()
    tag = "" if thread is threading.main_thread() else thread.name
    lanes: dict[str, Lane] = _lanes.setdefault(parent, dict)
    lane: Lane | None = lanes.get(tag)
    if lane is None:
        if _DEFAULT_THREAD_NAME.match(tag):
            logger.warning(
                "side channel for thread %r: threads are matched across ranks by name, and a "
                "default name counts the threads this process started before (a logger or "
                "tracker started on some ranks only shifts it), so the other ranks may call "
                "theirs differently and this thread's guards and barriers would wait for the "
                "timeout. Name the thread the same on every rank: threading.Thread(name=...), "
                "ThreadPoolExecutor(thread_name_prefix=...)", tag)
        name = parent.group_name + (f"/thread:{tag}" if tag else "")
        base = PrefixStore(f"accel_utils/side/{name}", parent.get_group_store())
        rank, size = dist.get_rank(parent), dist.get_world_size(parent)
        pulse = Pulse(base.clone() if hasattr(base, "clone") else base, rank, size, name)
        lane = lanes[tag] = Lane(name, rank, size,
                                 frozenset(dist.get_process_group_ranks(parent)), base, pulse)
        lane.store(lambda s: s.set(mark_key(rank), str(Mark(0, "-", 0))), None)
    return lane


def release_all() -> None:
    """Forget every lane (stopping its thread), so that its groups end now, not at exit."""
    for lanes in _lanes.values():
        for lane in lanes.values():
            lane.pulse.stop()
    _lanes.clear()
