"""FirstRankPerNode: one rank per node (or per job) runs a block first; nobody hangs or lies.

A guard is one operation on the group's side channel (:mod:`accel_utils._side`): the
waiting ranks enter its one-element all-reduce on ``__enter__``, the first ranks on ``__exit__``.
A failing first rank publishes a record (rank, node, exception) in the job's store, contributes
a set failure bit without waiting and raises its own exception at once; the others learn from
the bit, or from the record within a poll interval while another first rank is still busy.
While a guard lasts, every member's heartbeat runs, so a frozen or unreachable member is named
after ``liveness`` instead of the whole ``timeout``. An empty block costs the one all-reduce.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import ContextDecorator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from accel_utils._side import (
    DEFAULT_LIVENESS,
    PAYLOAD_BITS,
    Failure,
    Kind,
    Lane,
    Order,
    Phase,
    Record,
    Reduced,
    as_liveness,
    as_timeout,
    lane_for,
)
from accel_utils.errors import describe
from accel_utils.shared_dir import path_is_shared
from accel_utils.topology import Topology, node_layout, resolve

logger = logging.getLogger(__name__)

_WHAT = "FirstRankPerNode"
_active = threading.local()  # the guards this thread is inside of, outermost first


@dataclass(eq=False)
class _Entry:
    """One entry into a guard (a guard instance can be entered again as a decorator)."""

    topo: Topology
    timeout: timedelta
    liveness: float | None
    lane: Lane | None = None
    seq: int = 0
    order: Order = Order.GLOBAL
    first: bool = True
    outer: _Entry | None = None  # set when an enclosing guard already orders this block
    inner_failure: BaseException | None = None


class FirstRankPerNode(ContextDecorator):
    """Let one rank per node (``local=True``) or per group run a block before the others.

    ``with FirstRankPerNode(accelerator) as first:`` runs the block at once on the first ranks;
    the others wait (on the gloo side channel, at most ``timeout``) until every first rank has
    finished its block, then run it. Usable as a decorator and nested (an inner guard on the
    same group and order is ordered by the outer one already and costs nothing). Guards from
    several threads are fine: each thread has its own side channel, matched across ranks by
    thread name (give such threads the same name on every rank; default names such as
    ``Thread-7`` may differ between ranks, and a warning says so).

    Args:
        group: anything :func:`accel_utils.resolve` accepts; only its members take part.
        local: True: each node's local rank 0 goes first; False: only rank 0 of the group;
            ``"auto"``: probe once whether ``path`` is shared between nodes (see
            :func:`path_is_shared`) and use global order if it is, per-node order if not.
        timeout: how long a rank waits for the first ranks (default 10 hours, at most 30 days).
            ``__enter__(timeout=...)`` overrides it for one entry (NeMo Automodel's spelling).
        path: the cache directory, required with ``local="auto"`` only.
        liveness: how long (seconds or a timedelta) a member's heartbeat may stop while the
            guard lasts before every other member raises :class:`RanksNotRespondingError`
            naming it (frozen or unreachable); None turns it off. A block that holds the GIL
            longer than this (one long C call) looks frozen: raise it for such blocks.

    Raises (on entry or exit):
        FirstRankFailedError: on every other rank when a first rank's block raised or its
            process died; the failing rank raises its own exception (and logs it) at once.
        BarrierTimeoutError: a first rank did not finish within ``timeout`` (names it), or
            (:class:`RanksNotRespondingError`) a member stopped responding.
        SideChannelError: ranks made different guard / barrier calls, or the store was lost.
        ValueError / TypeError: bad arguments, or nested guards over overlapping groups that
            would wait on each other.

    An exception raised by a waiting rank's own block is that rank's ordinary error: it
    propagates unchanged. The block must not run collectives on ``group``. What it writes to
    files is there for the others; a ``TCPStore.set`` is not acknowledged by the store's
    server, so signal through the store with ``add`` or ``compare_set`` instead.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        local: bool | str = True,
        # 10 h: the block is preprocessing (tokenizing, downloading a corpus) that can take
        # hours on the first ranks while the others wait, and it is the seed's __enter__ default;
        # a first rank that raises, dies or freezes is reported within seconds or `liveness`,
        # so this bounds only a live rank that is still working.
        timeout: Any = timedelta(hours=10),
        path: str | os.PathLike[str] | None = None,
        liveness: Any = DEFAULT_LIVENESS,
    ) -> None:
        if local is not True and local is not False and local != "auto":
            raise ValueError(f"local must be True, False or 'auto'; got {local!r}")
        if (local == "auto") != (path is not None):
            raise ValueError("path= is required with local='auto' and only allowed with it")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
        self.group = group
        self.local = local
        self.timeout = as_timeout(timeout)
        self.liveness = as_liveness(liveness)
        self.path = None if path is None else os.fspath(path)
        self._threads = threading.local()  # one instance may guard blocks in several threads

    def _entries(self) -> list[_Entry]:
        if not hasattr(self._threads, "entries"):
            self._threads.entries = []
        entries: list[_Entry] = self._threads.entries
        return entries

    def __enter__(self, timeout: Any = None) -> bool:
        """Wait for the first ranks unless this rank is one; True on the ranks that go first.

        Args:
            timeout: overrides the constructor's ``timeout`` for this entry.
        """
        limit = self.timeout if timeout is None else as_timeout(timeout)
        topo = resolve(self.group)
        entry = _Entry(topo, limit, self.liveness)
        if topo.world_size > 1 and topo.group is not None:
            node_layout(topo.group, limit, self.liveness)  # a gather where the launcher is silent
            lane = entry.lane = lane_for(topo.group)
            entry.outer = _enclosing(lane)
            entry.order = self._order(topo, entry.outer, limit)
            place = topo.nodes.local_rank if entry.order is Order.PER_NODE else topo.rank
            entry.first = place == 0
            if entry.outer is not None and entry.outer.order != entry.order:
                raise ValueError("a nested FirstRankPerNode on the same group must use the same "
                                 "order")
            lane.post_place(topo.nodes.node_rank, topo.nodes.local_rank, self.liveness)
            if entry.outer is None:
                entry.seq = lane.begin()
                if lane.group is None:  # first ranks too: a rank that dies in its block then
                    lane.connect(entry.seq, _WHAT, limit, self.liveness)  # closes connections
                if entry.first:  # beats while the block runs: a frozen first rank is named
                    lane.pulse.activate(entry.seq, Phase.WORKING, self.liveness)
        _stack().append(entry)
        self._entries().append(entry)
        if entry.lane is not None and entry.outer is None and not entry.first:
            try:
                _settle(entry)
            except BaseException:
                _stack().remove(entry)
                self._entries().pop()
                raise
        return entry.first

    def __exit__(
        self, exc_type: Any, exc_val: BaseException | None, exc_tb: Any
    ) -> Literal[False]:
        """Release the waiting ranks, or report this first rank's failure to them.

        Args:
            exc_type: the exception's class if the block raised, else None.
            exc_val: the exception the block raised, else None.
            exc_tb: its traceback, else None.

        Returns:
            False: an exception raised in the block propagates on the rank that raised it.
        """
        entry = self._entries().pop()
        _stack().remove(entry)
        if entry.lane is None or not entry.first:
            return False  # alone, or a waiting rank: its own exception (if any) propagates
        if entry.outer is not None:  # the outer guard reports a failure in here to the others
            if exc_val is not None and entry.outer.first:
                entry.outer.inner_failure = exc_val
            return False
        failure = exc_val if exc_val is not None else entry.inner_failure
        if failure is None:
            _settle(entry)
            return False
        _report_failure(entry, failure)
        if exc_val is None:  # an inner guard's failure that the block caught: stop here anyway
            raise entry.lane.diagnosis.error(_record(entry, failure)) from failure
        return False

    def _order(self, topo: Topology, outer: _Entry | None, limit: timedelta) -> Order:
        if self.local != "auto":
            return Order.PER_NODE if self.local else Order.GLOBAL
        assert self.path is not None and topo.group is not None
        probes = lane_for(topo.group).memo.setdefault("shared", {})
        key = os.path.realpath(self.path)
        if key not in probes:
            if outer is not None:
                raise ValueError("a nested FirstRankPerNode(local='auto') needs its path probed "
                                 "outside the enclosing guard first")
            probes[key] = path_is_shared(self.path, topo.group, timeout=limit,
                                         liveness=self.liveness)
            if topo.rank == 0:
                logger.info("FirstRankPerNode: %s is %s -> %s order", self.path,
                            "shared between nodes" if probes[key] else "node-local",
                            "global" if probes[key] else "per-node")
        return Order.GLOBAL if probes[key] else Order.PER_NODE


def _stack() -> list[_Entry]:
    if not hasattr(_active, "stack"):
        _active.stack = []
    stack: list[_Entry] = _active.stack
    return stack


def _enclosing(lane: Lane) -> _Entry | None:
    """The active guard on the same lane, if any; rejects guards that would deadlock."""
    for entry in reversed(_stack()):
        if entry.lane is lane:
            return entry
        if entry.lane is not None and entry.lane.ranks & lane.ranks:
            raise ValueError(
                "nested FirstRankPerNode guards over different but overlapping groups would wait "
                "on each other; nest guards on the same group and order only"
            )
    return None


def _record(entry: _Entry, exc: BaseException) -> Record:
    return Record(Failure.FAILED, entry.seq, entry.topo.rank, _WHAT, rank=entry.topo.rank,
                  node=entry.topo.nodes.node_rank, exc_type=type(exc).__name__,
                  message=describe(exc)[:2000])


def _run(entry: _Entry, payload: int = 0, failed: bool = False, wait: bool = True) -> Reduced:
    """The guard's operation on its lane (see :meth:`Lane.run`)."""
    assert entry.lane is not None
    return entry.lane.run(entry.seq, Kind.GUARD, entry.order.value, _WHAT, entry.timeout,
                          entry.liveness, payload, failed, wait)


def _report_failure(entry: _Entry, exc: BaseException) -> None:
    """A first rank's block raised: record it and set the failure bit, without waiting."""
    lane = entry.lane
    assert lane is not None
    logger.error("rank %d (node %d) failed in its FirstRankPerNode block: %s: %s",
                 entry.topo.rank, entry.topo.nodes.node_rank, type(exc).__name__, describe(exc),
                 exc_info=(type(exc), exc, exc.__traceback__))
    try:
        lane.report(_record(entry, exc), entry.liveness)
        if lane.group is not None:  # else the others are still connecting: the record tells
            _run(entry, payload=min(entry.topo.rank + 1, (1 << PAYLOAD_BITS) - 1), failed=True,
                 wait=False)
    except Exception as err:  # noqa: BLE001 - this rank raises its own error regardless
        logger.warning("rank %d could not report its failure to the other ranks (%s): they "
                       "learn of it from the side channel's liveness or timeout instead",
                       entry.topo.rank, describe(err))
    finally:
        lane.pulse.deactivate()
        lane.abandon()


def _settle(entry: _Entry) -> None:
    """Join the guard's all-reduce; raise if a first rank failed, died, froze or timed out."""
    lane = entry.lane
    assert lane is not None
    seen = lane.pulse.records.get(lane.record_key(entry.seq))
    if seen is not None and seen.seq == entry.seq:  # heard of a failure during its block
        if lane.group is not None:
            _run(entry, wait=False)
        lane.fail(seen, liveness=entry.liveness)
    reduced = _run(entry)
    if reduced.failed:
        rank = reduced.payload - 1
        lane.fail(lane.failure(entry.seq, entry.liveness) or Record(
            Failure.FAILED, entry.seq, rank, _WHAT, rank=rank, exc_type="unknown",
            message="its failure record could not be read from the store"))
