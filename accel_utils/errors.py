"""Errors that every rank of a distributed job can raise instead of hanging.

Each one keeps the ranks involved as attributes and survives pickling with them (Ray,
multiprocessing and Trainer callbacks pickle exceptions).
"""

from __future__ import annotations

from typing import Any


def describe(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when the exception's own ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as err:  # noqa: BLE001 - a broken __str__ must not hide the failure
        return f"<str() of this {type(exc).__name__} raised {type(err).__name__}>"


def _nodes(ranks: list[int], nodes: dict[int, int | None] | None) -> str:
    known = sorted({n for r, n in (nodes or {}).items() if r in ranks and n is not None})
    return f" on node(s) {known}" if known else ""


class _Picklable(RuntimeError):
    """Pickles as ``type(self)(*self._args)``: attributes survive, not just the message."""

    _args: tuple[Any, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), self._args


class FirstRankFailedError(_Picklable):
    """A rank that went first through a guarded block failed; raised on the ranks that waited.

    Attributes:
        rank: the failing rank (within the guard's group), or None when unknown.
        node: the failing rank's node index, or None when unknown.
        exc_type: the name of the exception it raised, or ``"died"`` when its process is gone.
        exc_message: that exception's message.
    """

    def __init__(
        self, rank: int | None, node: int | None, exc_type: str, exc_message: str
    ) -> None:
        self._args = (rank, node, exc_type, exc_message)
        self.rank = rank
        self.node = node
        self.exc_type = exc_type
        self.exc_message = exc_message
        what = "died" if exc_type == "died" else f"failed with {exc_type}"
        super().__init__(
            f"first rank {rank} (node {node}) {what}: {exc_message}; "
            "this rank stops instead of using its half-done work"
        )


class BarrierTimeoutError(_Picklable):
    """Some ranks did not reach a barrier (or finish a guarded block) within its timeout.

    Attributes:
        missing_ranks: the ranks (within the barrier's group) that did not arrive.
        timeout_s: the timeout that ran out, in seconds.
        unresponsive_ranks: ranks that had arrived but stopped responding (frozen or
            unreachable) before the timeout ran out.
        nodes: the node index of each named rank, where known.
    """

    def __init__(
        self,
        missing_ranks: list[int],
        timeout_s: float,
        what: str = "barrier",
        unresponsive_ranks: list[int] | None = None,
        nodes: dict[int, int | None] | None = None,
    ) -> None:
        self._args = (missing_ranks, timeout_s, what, unresponsive_ranks, nodes)
        self.missing_ranks = list(missing_ranks)
        self.timeout_s = timeout_s
        self.unresponsive_ranks = list(unresponsive_ranks or [])
        self.nodes = dict(nodes or {})
        message = f"{what} timed out after {timeout_s:g}s"
        if self.missing_ranks or not self.unresponsive_ranks:
            message += (f" waiting for rank(s) {self.missing_ranks}"
                        f"{_nodes(self.missing_ranks, nodes)}")
        if self.unresponsive_ranks:
            message += (f"; rank(s) {self.unresponsive_ranks}"
                        f"{_nodes(self.unresponsive_ranks, nodes)} stopped responding "
                        "(frozen or unreachable)")
        super().__init__(message)


class RanksNotRespondingError(BarrierTimeoutError):
    """Ranks inside a guard or barrier stopped beating for ``liveness_s`` (frozen or unreachable).

    A subclass of :class:`BarrierTimeoutError`: code that catches timeouts catches this too,
    it just comes after ``liveness`` instead of the whole ``timeout``.

    Attributes:
        ranks: the ranks whose heartbeat stopped.
        liveness_s: how long their heartbeat had been silent.
        nodes: the node index of each named rank, where known.
    """

    def __init__(self, ranks: list[int], liveness_s: float, what: str = "barrier",
                 nodes: dict[int, int | None] | None = None) -> None:
        RuntimeError.__init__(
            self,
            f"{what}: rank(s) {list(ranks)}{_nodes(list(ranks), nodes)} not responding (frozen "
            f"or unreachable): no heartbeat for {liveness_s:g}s",
        )
        self._args = (ranks, liveness_s, what, nodes)
        self.ranks = self.missing_ranks = self.unresponsive_ranks = list(ranks)
        self.liveness_s = self.timeout_s = liveness_s
        self.nodes = dict(nodes or {})


class SideChannelError(_Picklable):
    """The side channel failed: calls that do not match across ranks, a lost store or peer.

    Attributes:
        calls: for mismatched calls, what each rank called (rank -> description).
        ranks: for lost peers, the ranks whose processes are gone (or the candidates).
    """

    def __init__(self, message: str, calls: dict[int, str] | None = None,
                 ranks: list[int] | None = None) -> None:
        self._args = (message, calls, ranks)
        self.calls = dict(calls or {})
        self.ranks = list(ranks or [])
        super().__init__(message)


class StallError(_Picklable):
    """A :class:`~accel_utils.HangWatch` with ``on_stall="raise"`` found training stalled.

    Attributes:
        ranks: the ranks the stall report names as the odd ones out (behind, elsewhere, not
            responding or dead); empty when every rank stands at the same place.
    """

    def __init__(self, message: str, ranks: list[int] | None = None) -> None:
        self._args = (message, ranks)
        self.ranks = list(ranks or [])
        super().__init__(message)
