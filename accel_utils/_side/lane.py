"""The lane: one parent group's side channel as one thread sees it, and its state machine.

Every guard, barrier and probe is an *operation* on its parent group's lane. Each member numbers
the operations it enters, so all members agree on the number ``seq`` of every call, failed ones
included. An operation is one reduction (OR) of a few words (:class:`~.wire.Call`) over a
binomial tree (:mod:`.tree`), so a mismatch raises on every rank instead of pairing the wrong
calls, and its critical path is ``2 log2`` of the members deep.

The gloo group is created by the first operation that needs it, under a store prefix named
after that operation, and is never reused after a failure: every member that fails an operation
(or learns of a failure through the store) parks its group, and the next operation builds a
fresh one under its own ``seq``, so every member lands on the same prefix again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
from torch.distributed.distributed_c10d import PrefixStore

from accel_utils._side.diagnosis import Diagnosis
from accel_utils._side.gloo import (
    WaitlessStore,
    connect_gloo,
    descriptors_short,
    finished,
    park,
    set_timeout,
)
from accel_utils._side.heartbeat import Pulse, store_lost
from accel_utils._side.timing import (
    GRACE_S,
    POLL_S,
    absent_silence_s,
    store_deadline,
    unresponsive_window,
)
from accel_utils._side.tree import Tree, gather, reduce_or
from accel_utils._side.wire import CONFIRM_BIT, Call, Failure, Kind, Phase, Record, Reduced
from accel_utils.errors import SideChannelError, describe

logger = logging.getLogger("accel_utils.side_channel")


class _Regroup(Exception):
    """The group failed under an earlier operation this member saw succeed: rebuild, retry."""


@dataclass(eq=False)
class Lane:
    """One parent group's side channel as seen by one thread of this process."""

    name: str
    rank: int  # within the parent group
    size: int
    ranks: frozenset[int]  # the members' global ranks, to tell overlapping groups apart
    link: WaitlessStore  # the lane's share of the job's store, as its gloo groups use it
    pulse: Pulse
    seq: int = 0  # operations entered; every member enters the same ones in the same order
    group: Any = None  # the current gloo group, None until (re)created
    tree: Tree | None = None  # the thread that runs the current group's operations
    gen: int = 0  # the seq whose prefix the current group was created under
    timeout: timedelta | None = None  # the gloo group's current timeout
    work: Any = None  # the operation in flight, parked with the group on a failure
    done: Any = None  # the group's last operation, completed: its parking frees it (gloo.park)
    label: str = ""  # the current operation's label (a guard's order)
    memo: dict[str, Any] = field(default_factory=dict)  # per-lane facts (probes, node posted)
    diagnosis: Diagnosis = field(init=False)

    def __post_init__(self) -> None:
        self.diagnosis = Diagnosis(self.name, self.rank, self.size, self.pulse)

    def post_place(self, node: int, local_rank: int, liveness: float | None) -> None:
        """Once per lane: this rank's node and local rank, so survivors can name its node."""
        if not self.memo.get("place"):
            key, value = f"node/{self.rank}", f"{node} {local_rank}"  # no reference to self
            self.pulse.store(lambda s: s.set(key, value), liveness)
            self.memo["place"] = True

    def begin(self) -> int:
        """Enter the next operation; returns its number (the same on every member)."""
        self.seq += 1
        return self.seq

    def record_key(self, seq: int) -> str:
        """Where operation ``seq``'s failure record lives (one key per group generation)."""
        return f"fail/{self.gen if self.group is not None else seq}"

    def report(self, record: Record, liveness: float | None) -> Record:
        """Publish ``record`` for its operation (first writer wins); returns the winner."""
        return self.diagnosis.publish(self.record_key(record.seq), record, liveness)

    def failure(self, seq: int, liveness: float | None) -> Record | None:
        """Operation ``seq``'s failure record in the store, if any."""
        return self.diagnosis.read(self.record_key(seq), liveness)

    # ------------------------------------------------------------------------ operations
    def run(self, seq: int, kind: Kind, label: str, what: str, limit: timedelta,
            liveness: float | None, payload: int = 0, failed: bool = False,
            wait: bool = True) -> Reduced:
        """Operation ``seq``: the OR of every member's ``payload`` (and the failure bit).

        With ``wait=False`` this member only contributes (a failing rank that must not wait),
        then parks the group. Raises on every failure, naming who and why (see the module).
        """
        self.label = label
        self.pulse.activate(seq, Phase.ARRIVED, liveness)
        # A member inside this operation for a while asks for a second round (and member 0
        # does, for a share that waited long in the tree): a peer that died or froze after its
        # share went through must not let some members pass.
        words = Call(kind, label, seq, payload, failed, self.pulse.lasted() > POLL_S).pack()
        try:
            while True:
                try:
                    tensor = self._start(seq, words, what, limit, liveness)
                    if not wait:
                        self.abandon()
                        return Reduced.nothing()
                    deadline = time.monotonic() + limit.total_seconds() + GRACE_S
                    self._watch(finished(self.work), seq, what, deadline, limit, liveness)
                    if Reduced(tuple(tensor.tolist())).confirm:
                        tensor = self._start(seq, words, what, limit, liveness)
                        self._watch(finished(self.work), seq, what, deadline, limit, liveness)
                    break
                except _Regroup:
                    logger.warning("%s: the side channel failed under an earlier call; "
                                   "rebuilding it for call %d", what, seq)
                    self.abandon()
        finally:
            self.pulse.deactivate()
        self.done, self.work = self.work, None
        result = Reduced(tuple(tensor.tolist()))
        if result.mismatched:
            raise self.diagnosis.mismatch(
                seq, f"{what}{label and f' {label!r}'} (call {seq})", liveness)
        return result

    def gather(self, seq: int, what: str, data: bytes, limit: timedelta,
               liveness: float | None) -> list[bytes]:
        """Operation ``seq``: every member's ``data``, in rank order, on every member.

        One agreeing operation (so a member in another call, or absent, is diagnosed as in
        every operation), then a gather over the tree, waited on with the same deadline and
        judgement.
        """
        self.run(seq, Kind.GATHER, "", what, limit, liveness)
        deadline = time.monotonic() + limit.total_seconds() + GRACE_S
        assert self.tree is not None  # made by the agreeing operation
        self.pulse.activate(seq, Phase.ARRIVED, liveness)
        try:
            work = self.work = self.tree.submit(functools.partial(gather, data=data,
                                                                  timeout=limit))
            self._watch(finished(work), seq, what, deadline, limit, liveness)
        finally:
            self.pulse.deactivate()
        self.done, self.work = work, None
        parts: list[bytes] = work.result
        return parts

    def _start(self, seq: int, words: list[int], what: str, limit: timedelta,
               liveness: float | None) -> torch.Tensor:
        if self.group is None:
            self._create(seq, what, limit, liveness)
        if self.timeout != limit:  # else a wait that gave up would leave its operation pending
            set_timeout(self.group, limit)
            self.timeout = limit
        tensor = torch.tensor(words, dtype=torch.int64)
        assert self.tree is not None  # made with the group
        self.work = self.tree.submit(functools.partial(
            reduce_or, tensor=tensor, timeout=limit, stale_s=POLL_S, stale_flag=CONFIRM_BIT))
        return tensor

    def connect(self, seq: int, what: str, limit: timedelta, liveness: float | None) -> None:
        """Create the gloo group under operation ``seq``'s prefix (collective over members)."""
        self.pulse.activate(seq, Phase.ARRIVED, liveness)
        try:
            self._create(seq, what, limit, liveness)
        finally:
            self.pulse.deactivate()

    def _short_of_descriptors(self, seq: int, what: str, liveness: float | None,
                              need: int = 0) -> None:
        """Fail on every member, naming this one, if it cannot open a side group's sockets."""
        short = descriptors_short(self.rank, need)
        if short:  # a clear error on every member, not a socket error on one
            self.fail(self.report(Record(Failure.RESOURCES, seq, self.rank, what,
                                         message=short), liveness))

    def _create(self, seq: int, what: str, limit: timedelta, liveness: float | None) -> None:
        box: dict[str, Any] = {}
        link, rank, size = self.link, self.rank, self.size
        self._short_of_descriptors(seq, what, liveness)

        def build() -> None:
            try:
                box["group"] = connect_gloo(PrefixStore(f"g{seq}", link), rank, size, limit)
            except Exception as exc:  # noqa: BLE001 - reported by the watching thread
                box["error"] = exc

        self.gen = seq
        thread = threading.Thread(target=build, name="accel-utils-connect", daemon=True)
        thread.start()

        def built(slice_: timedelta) -> bool:
            thread.join(slice_.total_seconds())
            if thread.is_alive():
                return False
            error = box.get("error")
            if error is None:
                return True
            # Evidence, not gloo's wording: a full descriptor table, else an error before the
            # timeout is this member's own (an interface, a refused connection), else the
            # rendezvous timed out and the marks say who did not come.
            self._short_of_descriptors(seq, what, liveness, need=64)
            if not _timed_out(deadline, limit):
                self.fail(self.report(Record(
                    Failure.CREATION, seq, self.rank, what, rank=self.rank,
                    exc_type=type(error).__name__, message=describe(error)[:2000]), liveness),
                    error, liveness)
            raise error

        deadline = time.monotonic() + limit.total_seconds() + GRACE_S
        try:
            self._watch(built, seq, what, deadline, limit, liveness)
        except BaseException:
            park(thread, box)  # it may still connect later: never free that group
            raise
        self.group, self.timeout = box["group"], limit
        self.tree = Tree(self.group, rank, size, keep=link)
        weakref.finalize(self, self.tree.close)  # a lane dropped with its parent group
        logger.debug("created gloo side group g%d for %s", seq, self.name)

    def _watch(self, done: Callable[[timedelta], Any], seq: int, what: str,
               deadline: float, limit: timedelta, liveness: float | None) -> None:
        """Wait until ``done(slice)`` is true, judging the others every ``POLL_S``."""
        key = self.record_key(seq)
        while True:
            left = deadline - time.monotonic()
            step = max(min(POLL_S, left), 0.001)
            try:
                if done(timedelta(seconds=step)) is not False:
                    return
            except SideChannelError:  # already a verdict
                raise
            except RuntimeError as err:  # gloo's verdict: our timeout, or a lost peer
                if _timed_out(deadline, limit):
                    self.fail(self.diagnosis.timed_out(key, seq, what, limit, liveness), err,
                              liveness)
                self.fail(self.diagnosis.lost(key, seq, what, self.label, liveness, err), err,
                          liveness)
            if left <= 0:
                self.fail(self.diagnosis.timed_out(key, seq, what, limit, liveness), None,
                          liveness)
            self._judge(seq, what, liveness)

    def _judge(self, seq: int, what: str, liveness: float | None) -> None:
        record = self.pulse.records.get(self.record_key(seq))
        if record is not None:
            if record.seq < seq:
                raise _Regroup
            self.fail(record, liveness=liveness)
        patience = store_deadline(liveness)
        unanswered = self.pulse.unanswered_for()
        if unanswered > patience:  # every verdict needs the store: none can be had
            self.abandon()
            raise SideChannelError(
                f"{what}: {store_lost(f'no answer for {unanswered:.1f}s')}")
        self._judge_absent(seq, what, liveness)
        if liveness is None:
            return
        if not self.pulse.stale(seq, liveness):
            return
        window = unresponsive_window(liveness)  # name every member silent that long, not one
        self.pulse.widen()
        if self.pulse.wide_for() >= window:
            stale = self.pulse.stale(seq, window)
            self.fail(self.report(Record(Failure.UNRESPONSIVE, seq, self.rank, what,
                                         ranks=tuple(stale), liveness_s=liveness), liveness))

    def _judge_absent(self, seq: int, what: str, liveness: float | None) -> None:
        """Watched members that never entered this operation: dead (gone from this host) at
        once, not responding once their sign of life stood still (see ``absent_silence_s``)."""
        window = None if liveness is None else absent_silence_s(liveness)
        gone, silent = self.pulse.absent(window)
        if gone:
            self.fail(self.diagnosis.gone(self.record_key(seq), seq, what, self.label, liveness))
        if silent:
            self.fail(self.report(Record(Failure.UNRESPONSIVE, seq, self.rank, what,
                                         ranks=tuple(silent), liveness_s=window), liveness))

    def abandon(self) -> None:
        """Stop using the group (it may hold a pending operation): park it, build anew later."""
        if self.group is not None:
            park(self.group, self.link, work=self.done if self.work is None else self.work)
        if self.tree is not None:
            self.tree.close()
        self.group, self.tree, self.work, self.done, self.timeout = None, None, None, None, None

    def fail(self, record: Record, cause: BaseException | None = None,
             liveness: float | None = None) -> NoReturn:
        """Abandon the group and raise the error that ``record`` describes."""
        key = self.record_key(record.seq)
        self.abandon()
        if record.kind is Failure.TIMEOUT:
            record = self.diagnosis.complete(record, key, liveness)
        raise self.diagnosis.error(record) from cause


def _timed_out(deadline: float, limit: timedelta) -> bool:
    """Whether gloo's own timeout (``limit``, which our ``deadline`` trails) has run out by now:
    the evidence that tells its timeout from any other error, whatever its message says."""
    started = deadline - GRACE_S - limit.total_seconds()
    return time.monotonic() - started >= 0.9 * limit.total_seconds()
