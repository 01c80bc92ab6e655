"""FirstRankPerNode: one rank per node (or per job) runs a block first; nobody hangs or lies.

One status all-reduce on the group's cached gloo side channel per guard: the waiting ranks enter
it on ``__enter__``, the first ranks on ``__exit__``. The status is one element (gloo reduces
one element several times faster than a few): the highest failing rank + 1, by a MAX reduction,
0 when all went well. A failing first rank also leaves a record (rank, node, exception) in the
job's store and does not wait, so the others learn within a poll interval even while another
first rank is still busy. A killed first rank breaks the gloo connections; the survivors then
read the ranks' arrival marks to say who never finished. An empty block costs that one
all-reduce: the store is only used by waits longer than a poll interval and on failures.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import ContextDecorator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from accel_utils.barriers import (
    _arrive,
    _as_timeout,
    _channel,
    _drop,
    _exchange,
    _missing,
    _post_arrival,
    _SideChannel,
    _SideWaitFailed,
)
from accel_utils.errors import BarrierTimeoutError, FirstRankFailedError
from accel_utils.shared_dir import path_is_shared
from accel_utils.topology import Topology

logger = logging.getLogger(__name__)

_active = threading.local()  # the guards this thread is inside of, outermost first


@dataclass(eq=False)
class _Entry:
    """One entry into a guard (a guard instance can be entered again as a decorator)."""

    topo: Topology
    timeout: timedelta
    channel: _SideChannel | None = None
    order: str = "global"
    first: bool = True
    outer: _Entry | None = None  # set when an enclosing guard already orders this block
    inner_failure: BaseException | None = None


class FirstRankPerNode(ContextDecorator):
    """Let one rank per node (``local=True``) or per group run a block before the others.

    ``with FirstRankPerNode(accelerator) as first:`` runs the block at once on the first ranks;
    the others wait (on the gloo side channel, at most ``timeout``) until every first rank has
    finished its block, then run it. Usable as a decorator and nested (an inner guard on the
    same group and order is ordered by the outer one already and costs nothing).

    Args:
        group: anything :func:`accel_utils.resolve` accepts; only its members take part.
        local: True: each node's local rank 0 goes first; False: only rank 0 of the group;
            ``"auto"``: probe once whether ``path`` is shared between nodes (see
            :func:`path_is_shared`) and use global order if it is, per-node order if not.
        timeout: how long a rank waits for the first ranks (default 10 hours).
        path: the cache directory, required with ``local="auto"`` only.

    Raises (on entry or exit):
        FirstRankFailedError: on every other rank when a first rank's block raised or its
            process died; the failing rank raises its own exception (and logs it).
        BarrierTimeoutError: a first rank did not finish within ``timeout`` (names it).
        ValueError / TypeError: bad arguments, or nested guards over overlapping groups that
            would wait on each other.

    An exception raised by a waiting rank's own block is that rank's ordinary error: it
    propagates unchanged. The block must not run collectives on ``group``.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        local: bool | str = True,
        timeout: timedelta = timedelta(hours=10),
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if local is not True and local is not False and local != "auto":
            raise ValueError(f"local must be True, False or 'auto'; got {local!r}")
        if (local == "auto") != (path is not None):
            raise ValueError("path= is required with local='auto' and only allowed with it")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
        self.group = group
        self.local = local
        self.timeout = _as_timeout(timeout)
        self.path = None if path is None else os.fspath(path)
        self._entries: list[_Entry] = []

    def __enter__(self, timeout: timedelta | None = None) -> bool:
        """Wait for the first ranks unless this rank is one; True on the ranks that go first.

        Args:
            timeout: overrides the constructor's ``timeout`` for this entry (the seed's place).
        """
        limit = self.timeout if timeout is None else _as_timeout(timeout)
        topo, channel = _channel(self.group, limit)
        entry = _Entry(topo, limit, channel)
        if topo.world_size > 1:
            if channel is None:
                raise RuntimeError("FirstRankPerNode: no gloo side group (see the warning above)")
            entry.outer = _enclosing(channel)
            entry.order = self._order(topo, channel, entry.outer, limit)
            entry.first = topo.nodes.local_rank == 0 if entry.order == "local" else topo.rank == 0
            if entry.outer is not None and entry.outer.order != entry.order:
                raise ValueError("a nested FirstRankPerNode on the same group must use the same "
                                 "order")
            _remember_node(channel, topo)
        stack = _stack()
        stack.append(entry)
        self._entries.append(entry)
        if topo.world_size > 1 and entry.outer is None and not entry.first:
            try:
                _settle(entry)
            except BaseException:
                stack.remove(entry)
                self._entries.pop()
                raise
        return entry.first

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        entry = self._entries.pop()
        _stack().remove(entry)
        if entry.channel is None or not entry.first:
            return False  # alone, or a waiting rank: its own exception (if any) propagates
        if entry.outer is not None:  # the outer guard reports a failure in here to the others
            if exc is not None and entry.outer.first:
                entry.outer.inner_failure = exc
            return False
        failure = exc if exc is not None else entry.inner_failure
        if failure is None:
            _settle(entry)
            return False
        _report_failure(entry, failure)
        if exc is None:  # an inner guard's failure that the block caught: stop here anyway
            raise _error(_record(entry, failure)) from failure
        return False

    def _order(self, topo: Topology, channel: _SideChannel, outer: _Entry | None,
               limit: timedelta) -> str:
        if self.local != "auto":
            return "local" if self.local else "global"
        assert self.path is not None
        probes = channel.memo.setdefault("shared", {})
        key = os.path.realpath(self.path)
        if key not in probes:
            if outer is not None:
                raise ValueError("a nested FirstRankPerNode(local='auto') needs its path probed "
                                 "outside the enclosing guard first")
            probes[key] = path_is_shared(self.path, topo.group, timeout=limit)
            if topo.rank == 0:
                logger.info("FirstRankPerNode: %s is %s -> %s order", self.path,
                            "shared between nodes" if probes[key] else "node-local",
                            "global" if probes[key] else "per-node")
        return "global" if probes[key] else "local"


def _stack() -> list[_Entry]:
    if not hasattr(_active, "stack"):
        _active.stack = []
    return _active.stack


def _enclosing(channel: _SideChannel) -> _Entry | None:
    """The active guard on the same side channel, if any; rejects guards that would deadlock."""
    for entry in reversed(_stack()):
        if entry.channel is channel:
            return entry
        if entry.channel is not None and entry.channel.ranks & channel.ranks:
            raise ValueError(
                "nested FirstRankPerNode guards over different but overlapping groups would wait "
                "on each other; nest guards on the same group and order only"
            )
    return None


def _key(seq: int) -> str:
    return f"guard/{seq}/failure"


def _record(entry: _Entry, exc: BaseException) -> dict[str, Any]:
    return {"kind": "failed", "rank": entry.topo.rank, "node": entry.topo.nodes.node_rank,
            "exc_type": type(exc).__name__, "message": str(exc)[:2000]}


def _publish(channel: _SideChannel, seq: int, record: dict[str, Any]) -> None:
    try:  # first writer wins: later ranks only echo the first diagnosis
        channel.store.compare_set(_key(seq), "", json.dumps(record))
    except Exception:  # noqa: BLE001 - the store's host is gone; the flags still tell
        logger.debug("could not publish a guard failure record", exc_info=True)


def _read(channel: _SideChannel, seq: int) -> dict[str, Any] | None:
    try:
        if channel.store.check([_key(seq)]):
            return json.loads(channel.store.get(_key(seq)))
    except Exception:  # noqa: BLE001 - the store's host is gone
        logger.debug("could not read a guard failure record", exc_info=True)
    return None


def _error(record: dict[str, Any]) -> Exception:
    if record["kind"] == "timeout":
        return BarrierTimeoutError(record["missing"], record["timeout_s"], "FirstRankPerNode")
    return FirstRankFailedError(record["rank"], record["node"], record["exc_type"],
                                record["message"])


def _raise(channel: _SideChannel, record: dict[str, Any], cause: Any = None) -> NoReturn:
    # Every member raises on a failed guard, so all of them drop the channel (it may hold an
    # abandoned operation) and the next guard builds a fresh one on every member alike.
    _drop(channel)
    if record["kind"] != "timeout":
        logger.error("rank %d stops: %s", channel.rank, _error(record))
    raise _error(record) from cause


def _report_failure(entry: _Entry, exc: BaseException) -> None:
    """A first rank's block raised: say so in the store and the status, without waiting."""
    channel = entry.channel
    assert channel is not None
    logger.error("rank %d (node %d) failed in its FirstRankPerNode block: %s: %s",
                 entry.topo.rank, entry.topo.nodes.node_rank, type(exc).__name__, exc,
                 exc_info=(type(exc), exc, exc.__traceback__))
    seq = _arrive(channel)
    _post_arrival(channel, seq)  # it did arrive: survivors must not call it missing
    _publish(channel, seq, _record(entry, exc))
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    # completes once the others arrive; nobody waits on it
    channel.group.allreduce([torch.tensor([entry.topo.rank + 1])], opts)
    _drop(channel)


def _settle(entry: _Entry) -> None:
    """Join the guard's status all-reduce; raise if a first rank failed, died or timed out."""
    channel = entry.channel
    status = torch.zeros(1, dtype=torch.int64)
    assert channel is not None
    seq = _arrive(channel)

    def poll() -> None:
        record = _read(channel, seq)
        if record is not None:
            _raise(channel, record)

    try:
        _exchange(channel, seq, status, entry.timeout, poll, dist.ReduceOp.MAX)
    except _SideWaitFailed as err:
        record = _read(channel, seq) or _diagnose(channel, seq, err, entry.timeout)
        _raise(channel, record, err)
    if status.item() > 0:
        record = _read(channel, seq) or {"kind": "failed", "rank": status.item() - 1, "node": None,
                                         "exc_type": "unknown", "message": "no record in store"}
        _raise(channel, record)


def _remember_node(channel: _SideChannel, topo: Topology) -> None:
    # Once per side channel: lets survivors name the node of a rank that died.
    if not channel.memo.get("roster"):
        channel.store.set(f"node/{channel.rank}", str(topo.nodes.node_rank))
        channel.memo["roster"] = True


def _diagnose(channel: _SideChannel, seq: int, err: _SideWaitFailed,
              timeout: timedelta) -> dict[str, Any]:
    """Turn a failed wait without a failure record into one, and publish it for the others."""
    missing = _missing(channel, seq)
    if err.timed_out:
        record: dict[str, Any] = {"kind": "timeout", "missing": missing,
                                  "timeout_s": timeout.total_seconds()}
    else:
        rank = missing[0] if len(missing) == 1 else None
        node = None
        try:
            if rank is not None and channel.store.check([f"node/{rank}"]):
                node = int(channel.store.get(f"node/{rank}"))
        except Exception:  # noqa: BLE001 - the store's host is gone
            logger.debug("could not read the node of rank %s", rank, exc_info=True)
        who = "it" if rank is not None else f"one of rank(s) {missing}"
        record = {"kind": "died", "rank": rank, "node": node, "exc_type": "killed",
                  "message": f"lost the connection while {who} had not finished its block "
                             f"(killed or crashed?): {err}"}
    _publish(channel, seq, record)
    return _read(channel, seq) or record
