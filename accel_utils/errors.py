"""Errors that every rank of a distributed job can raise instead of hanging."""

from __future__ import annotations


class FirstRankFailedError(RuntimeError):
    """A rank that went first through a guarded block failed; raised on the ranks that waited.

    Attributes:
        rank: the failing rank (within the guard's group), or None when unknown.
        node: the failing rank's node index, or None when unknown.
        exc_type: the name of the exception it raised (or "killed" when it died).
        exc_message: that exception's message.
    """

    def __init__(
        self, rank: int | None, node: int | None, exc_type: str, exc_message: str
    ) -> None:
        self.rank = rank
        self.node = node
        self.exc_type = exc_type
        self.exc_message = exc_message
        super().__init__(
            f"first rank {rank} (node {node}) failed with {exc_type}: {exc_message}; "
            "this rank stops instead of using its half-done work"
        )


class BarrierTimeoutError(RuntimeError):
    """Some ranks did not reach a barrier within its timeout.

    Attributes:
        missing_ranks: the ranks (within the barrier's group) that did not arrive.
        timeout_s: the timeout that ran out, in seconds.
    """

    def __init__(self, missing_ranks: list[int], timeout_s: float, what: str = "barrier") -> None:
        self.missing_ranks = list(missing_ranks)
        self.timeout_s = timeout_s
        super().__init__(
            f"{what} timed out after {timeout_s:g}s waiting for rank(s) {self.missing_ranks}"
        )
