"""The side channel's operations over a binomial tree of point-to-point messages, so that their
critical path grows with ``log2`` of the members, not with them: the OR of a few words (every
guard, barrier and probe) and the gather of every member's bytes (node identity, results).

Gloo's own all-reduce is a ring: ``2 (n - 1)`` messages one after the other, 63 ms at 256 ranks
on one machine and seconds at thousands. Here every member sends its words, OR-ed with those of
its subtree, to its parent; member 0 then holds the OR of all and sends it back down the same
tree: at most ``ceil(log2 n)`` hops up and as many down. A member talks to its parent and its
children only, so with gloo's lazy connections it holds two sockets on average
(``ceil(log2 n)`` at member 0). Ranks of a node are numbered together under every launcher, so
the tree's lowest levels, where most messages go, stay inside a node.

A gather goes up the same way (a subtree is a contiguous range of ranks: its lengths, then its
bytes) and comes down whole. A daemon thread per group sends and receives (a point-to-point
wait cannot be taken a slice at a time), so an operation goes on after its caller stopped
waiting on it, as gloo's own collectives do: a failing first rank that only contributes still
passes its subtree's words on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

_UP, _DOWN = 0x5A1, 0x5A2  # message tags (words going up, the result coming down), apart
# from the small ones that torch's own point-to-point uses (monitored_barrier: 1 and 2)


def parent(rank: int) -> int | None:
    """``rank``'s parent in the tree (its lowest set bit cleared); None for member 0."""
    return rank & (rank - 1) if rank else None


def span(rank: int, size: int) -> int:
    """How many members ``rank``'s subtree holds: the ranks from ``rank`` on, that many."""
    return min(rank & -rank, size - rank) if rank else size


def children(rank: int, size: int) -> list[int]:
    """``rank``'s children, nearest (smallest subtree) first."""
    lowest = rank & -rank if rank else 1 << size.bit_length()
    out, bit = [], 1
    while bit < lowest and rank + bit < size:
        out.append(rank + bit)
        bit <<= 1
    return out


def depth(size: int) -> int:
    """Sequential message hops on an operation's critical path: up the tree and down again.

    A rank is as many hops below member 0 as it has bits set, so the tree is as high as the
    most bits set in a rank below ``size``: at most ``ceil(log2 size)``.
    """
    top = size - 1
    return 2 * max(top.bit_length() - 1, top.bit_count())  # 2**(bits-1) - 1: one bit fewer


class _Messages:
    """One operation's point-to-point messages, each waited on within the operation's deadline
    (a point-to-point wait knows no group timeout)."""

    def __init__(self, group: Any, timeout: timedelta) -> None:
        self.group, self._deadline = group, time.monotonic() + timeout.total_seconds()

    def wait(self, *works: Any) -> None:
        for work in works:
            work.wait(timedelta(seconds=max(self._deadline - time.monotonic(), 0.001)))

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> torch.Tensor:
        if tensor.numel():  # an empty message is none: both sides know its length
            self.wait(self.group.recv([tensor], peer, tag))
        return tensor

    def send(self, tensors: list[torch.Tensor], peers: list[int], tag: int) -> None:
        self.wait(*[self.group.send([t], peer, tag) for peer in peers for t in tensors
                    if t.numel()])


def reduce_or(group: Any, rank: int, size: int, tensor: torch.Tensor, timeout: timedelta,
              stale_s: float = float("inf"), stale_flag: int = 0) -> torch.Tensor:
    """Replace ``tensor`` (int64 words) by the OR of every member's, in place; blocks.

    If a member's words are older than ``stale_s`` when member 0 holds them all, ``stale_flag``
    is OR-ed into the last word of the result: a member whose share went through long ago may
    have died or been cut off since (gloo's ring, which needs every member until the end, could
    not finish then; the tree can), so the caller asks every member again. Each message up
    carries its subtree's oldest share's age, measured with each member's own clock.

    Raises:
        RuntimeError: gloo's error: a lost peer, or ``timeout`` ran out (gloo then closes the
            group's connections, so its peers stop waiting too).
    """
    messages, kids, start = _Messages(group, timeout), children(rank, size), time.monotonic()
    up_msg = torch.cat([tensor, torch.zeros(1, dtype=torch.int64)])  # + the oldest share's age
    parts = [torch.empty_like(up_msg) for _ in kids]
    works = [group.recv([part], kid, _UP) for part, kid in zip(parts, kids, strict=True)]
    arrived = []
    for work, part in zip(works, parts, strict=True):
        messages.wait(work)
        arrived.append((time.monotonic(), int(part[-1])))
        up_msg[:-1].bitwise_or_(part[:-1])
    now = time.monotonic()
    oldest_us = max([now - start] + [now - at + age / 1e6 for at, age in arrived]) * 1e6
    tensor.copy_(up_msg[:-1])
    up = parent(rank)
    if up is not None:
        up_msg[-1] = int(oldest_us)
        messages.send([up_msg], [up], _UP)
        messages.recv(tensor, up, _DOWN)
    elif oldest_us > stale_s * 1e6:
        tensor[-1] |= stale_flag
    messages.send([tensor], kids[::-1], _DOWN)  # the widest subtree first
    return tensor


def gather(group: Any, rank: int, size: int, data: bytes, timeout: timedelta) -> list[bytes]:
    """Every member's ``data``, in rank order, on every member; blocks (raises as
    :func:`reduce_or`)."""
    messages = _Messages(group, timeout)
    lengths = [torch.tensor([len(data)], dtype=torch.int64)]
    blobs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
             else torch.empty(0, dtype=torch.uint8)]
    for kid in children(rank, size):  # nearest first: their ranks follow on from ours
        part = messages.recv(torch.empty(span(kid, size), dtype=torch.int64), kid, _UP)
        lengths.append(part)
        blobs.append(messages.recv(torch.empty(int(part.sum()), dtype=torch.uint8), kid, _UP))
    every, blob = torch.cat(lengths), torch.cat(blobs)
    up = parent(rank)
    if up is not None:
        messages.send([every, blob], [up], _UP)
        every = messages.recv(torch.empty(size, dtype=torch.int64), up, _DOWN)
        blob = messages.recv(torch.empty(int(every.sum()), dtype=torch.uint8), up, _DOWN)
    messages.send([every, blob], children(rank, size)[::-1], _DOWN)
    raw, ends = blob.numpy().tobytes(), torch.cumsum(every, 0).tolist()
    return [raw[end - n:end] for end, n in zip(ends, every.tolist(), strict=True)]


class Work:
    """An operation run by a :class:`Tree`'s thread, waited on like a gloo work."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.result: Any = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Wait until the operation ends (at most ``timeout``); raises its error.

        Raises:
            RuntimeError: the timeout ran out first (:meth:`is_completed` is still False), or
                the operation's own error (a lost peer, gloo's timeout).
        """
        if not self._done.wait(None if timeout is None else timeout.total_seconds()):
            raise RuntimeError(f"side-channel operation still running after {timeout}")
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()

    def exception(self) -> BaseException | None:
        return self._error


_CLOSE_S = 30.0  # at most this long for an idle thread to end (never reached but on a hang)
Job = Callable[[Any, int, int], Any]  # (group, rank, size) -> result
_Jobs = queue.SimpleQueue["tuple[Job, Work] | None"]


class Tree:
    """The operations of one gloo group, run in order by a daemon thread of its own."""

    def __init__(self, group: Any, rank: int, size: int, keep: Any = None) -> None:
        self._jobs: _Jobs = queue.SimpleQueue()
        self._last: Work | None = None
        self._thread = threading.Thread(target=_serve, args=(self._jobs, group, rank, size, keep),
                                        name="accel-utils-tree", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Work:
        """Start ``job(group, rank, size)`` (:func:`reduce_or` or :func:`gather` with their
        other arguments bound) after those started before; its :class:`Work`."""
        work = self._last = Work()
        self._jobs.put((job, work))
        return work

    def close(self) -> None:
        """End the thread once the operations started so far have ended.

        An idle thread is waited for, so that its reference to the group is gone before the
        caller drops its own: the group must not be destroyed on this daemon thread, whose
        destructor releases the GIL and, if the interpreter finalizes meanwhile, ends the
        process with ``terminate called without an active exception``.
        """
        self._jobs.put(None)
        if self._last is None or self._last.is_completed():  # it only has to dequeue and go:
            self._thread.join(timeout=_CLOSE_S)  # a short cap could run out on a loaded host


def _serve(jobs: _Jobs, group: Any, rank: int, size: int, keep: Any) -> None:
    # A function, not a method: the thread must not keep its Tree alive; it keeps ``keep``
    # (the store the group calls back into) as long as the group.
    while (item := jobs.get()) is not None:
        job, work = item
        try:
            work.result = job(group, rank, size)
        except RuntimeError as exc:  # gloo's errors (DistError is one)
            work._error = exc
        except Exception as exc:  # noqa: BLE001 - handed to the waiter as gloo's would be
            work._error = RuntimeError(f"side-channel operation failed: {exc!r}")
        work._done.set()
