"""Applying an eval shard: this rank's part of the samples, and every rank's results gathered back.

``shard`` is what :func:`accel_utils.dp_eval_sample_shard` returned: ``(rank, size)``, or None
when every rank scores every sample.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from accel_utils._side import DEFAULT_LIVENESS, as_liveness, as_timeout, lane_for
from accel_utils.topology import resolve

Shard = tuple[int, int]
# Ranks arrive at the gather when their generation ends: as long as torch's default process
# group timeout, the longest one rank's eval may lag behind another's.
GATHER_TIMEOUT = timedelta(minutes=30)


def shard_samples(samples: Any, shard: Shard | None) -> Any:
    """This rank's contiguous part of ``samples``; ``shard=None`` returns them unchanged.

    Parts differ in size by at most one (the first ``len % size`` parts are one longer); nothing
    is padded or repeated, so a rank may get no samples at all.

    Args:
        samples: a list, tuple (any ``Sequence``) or ``datasets.Dataset``.
        shard: ``(rank, size)`` from :func:`dp_eval_sample_shard`, or None.

    Returns:
        The same kind of object holding this rank's samples, in their original order.
    """
    if shard is None:
        return samples
    rank, size = _check_shard(shard)
    start, stop = _bounds(len(_sized(samples)), rank, size)
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(samples, datasets.Dataset):
        # select(range(n, n)) on an n-row Dataset raises IndexError: an empty part is select([])
        return samples.select(range(start, stop) if stop > start else [])
    return samples[start:stop]


def _sized(samples: Any) -> Any:
    datasets = sys.modules.get("datasets")
    if isinstance(samples, Sequence) or (
        datasets is not None and isinstance(samples, datasets.Dataset)
    ):
        return samples
    raise TypeError(
        f"samples: expected a list, tuple or datasets.Dataset, got {type(samples).__name__}"
    )


def _check_shard(shard: Any) -> Shard:
    if not (
        isinstance(shard, tuple)
        and len(shard) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
    ):
        raise TypeError(f"shard: expected None or a (rank, size) tuple of ints, got {shard!r}")
    rank, size = shard
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard: expected 0 <= rank < size, got {shard}")
    return rank, size


def _bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_sharded_results(results: Any, shard: Shard | None, group: Any = None, *,
                           timeout: Any = GATHER_TIMEOUT,
                           liveness: Any = DEFAULT_LIVENESS) -> list[Any]:
    """Every rank's per-sample results, back in the original sample order, on every rank.

    The inverse of :func:`shard_samples`: one gather over ``group``'s gloo side channel (objects
    stay on the CPU, whatever the group's backend), then the parts are joined by shard index.
    The gather is bounded by ``timeout`` and judged like a barrier: a rank that never comes,
    died or froze is named on every rank. Ranks that share a shard index (the ranks of one HSDP
    replica) contribute one copy; a rank with no samples takes part like any other, so nobody
    waits for it.

    Every rank also sends whether its arguments are valid in that one gather, so a mistake on
    one rank (an invalid shard, ``None`` on some ranks and a tuple on others, parts whose sizes
    do not fit :func:`shard_samples`' layout) raises the same error on every rank instead of
    leaving the others waiting or joining misaligned results. With ``shard=None`` on every rank
    the gather carries only that marker (a few bytes), not the results.

    Args:
        results: this rank's results, one picklable item per sample of its shard.
        shard: the same ``(rank, size)`` (or None) that :func:`shard_samples` was given.
        group: the group every rank of the eval belongs to: None (the default group), an
            Accelerator, a PartialState, a ProcessGroup or a DeviceMesh.
        timeout: how long to wait for the other ranks (a ``timedelta`` or seconds).
        liveness: see :func:`accel_utils.barrier`.

    Returns:
        All results as one list; ``results`` unchanged when ``shard`` is None.

    Raises:
        TypeError: this rank's ``shard`` or ``results`` has the wrong type (without a group);
            with a group, on every rank, when that is the only kind of mistake.
        ValueError: on every rank alike: a rank's shard is invalid, some ranks passed None and
            others a shard, the ranks' shards do not cover ``range(size)`` or disagree on
            ``size``, ranks of one replica returned different numbers of results, or a part's
            size is not the one :func:`shard_samples` gives for the total.
    """
    limit, live = as_timeout(timeout), as_liveness(liveness)
    topo = resolve(group)
    if topo.group is None:  # one process: nothing to agree on
        if shard is None:
            unchanged: list[Any] = results  # what the caller passed, as documented
            return unchanged
        rank, size = _check_shard(shard)
        return _merge([(rank, size, _as_list(results))], size)
    lane = lane_for(topo.group)
    parts = lane.gather(lane.begin(), "gather_sharded_results",
                        pickle.dumps(_entry(results, shard)), limit, live)
    return _agree([pickle.loads(p) for p in parts], results)


_NONE = "none"  # a rank's entry when its shard is None
_BAD = "bad"  # (_BAD, exception type name, message) when its arguments are invalid


def _as_list(results: Any) -> list[Any]:
    try:
        return list(results)
    except TypeError:
        raise TypeError(
            f"results: expected an iterable of per-sample results, got {type(results).__name__}"
        ) from None


def _entry(results: Any, shard: Any) -> tuple[Any, ...]:
    if shard is None:
        return (_NONE,)
    try:
        rank, size = _check_shard(shard)
        return (rank, size, _as_list(results))
    except (TypeError, ValueError) as exc:
        return (_BAD, type(exc).__name__, str(exc))


def _agree(gathered: list[tuple[Any, ...]], results: Any) -> list[Any]:
    """The same outcome on every rank from the gathered entries: results, or one error."""
    bad = [(r, e[1], e[2]) for r, e in enumerate(gathered) if e[0] == _BAD]
    if bad:
        kinds = {kind for _, kind, _ in bad}
        error = TypeError if kinds == {"TypeError"} else ValueError
        raise error(
            "gather_sharded_results: invalid arguments on "
            + "; ".join(f"rank {r}: {message}" for r, _, message in bad)
        )
    nones = [r for r, e in enumerate(gathered) if e[0] == _NONE]
    if len(nones) == len(gathered):
        unchanged: list[Any] = results  # what the caller passed, as documented
        return unchanged
    if nones:
        others = [r for r in range(len(gathered)) if r not in nones]
        raise ValueError(
            f"gather_sharded_results: shard is None on rank(s) {nones} but a (rank, size) tuple "
            f"on rank(s) {others}: every rank must pass what dp_eval_sample_shard returned for "
            "the same model or configuration"
        )
    size = gathered[0][1]
    return _merge(gathered, size)


def _merge(entries: list[tuple[int, int, list[Any]]], size: int) -> list[Any]:
    """Join ``(shard index, shard size, part)`` entries, one per group rank, in shard order.

    Raises ValueError when the entries do not form :func:`shard_samples`' layout of one sample
    list: a disagreeing size, a missing shard, ranks of one shard (replica) with parts of
    different lengths, or part lengths that are not the contiguous near-equal split of the total.
    """
    parts: dict[int, list[Any]] = {}
    holders: dict[int, list[tuple[int, int]]] = {}
    for group_rank, (index, their_size, part) in enumerate(entries):
        if their_size != size:
            raise ValueError(f"ranks disagree on the shard size ({their_size} vs {size})")
        parts.setdefault(index, part)
        holders.setdefault(index, []).append((group_rank, len(part)))
    missing = sorted(set(range(size)) - set(parts))
    if missing:
        raise ValueError(
            f"no rank of the group holds shard(s) {missing} of {size}: pass every rank's shard "
            "from dp_eval_sample_shard and a group that spans all of them"
        )
    for index in range(size):
        if len({n for _, n in holders[index]}) > 1:
            counts = ", ".join(f"rank {r}: {n}" for r, n in holders[index])
            raise ValueError(
                f"the ranks of shard {index} (one replica) returned different numbers of "
                f"results ({counts}): they score the same samples and must return one result each"
            )
    total = sum(len(part) for part in parts.values())
    wrong = [
        (index, len(parts[index]), stop - start)
        for index in range(size)
        for start, stop in [_bounds(total, index, size)]
        if len(parts[index]) != stop - start
    ]
    if wrong:
        detail = "; ".join(f"shard {i} has {got}, expected {want}" for i, got, want in wrong)
        raise ValueError(
            f"the results do not fit the shard layout of {total} samples over {size} shards "
            f"({detail}): each rank must return exactly one result per sample that "
            "shard_samples gave it, or the gathered results would be misaligned"
        )
    return [item for index in range(size) for item in parts[index]]
