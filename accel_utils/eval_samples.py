"""Applying an eval shard: this rank's part of the samples, and every rank's results gathered back.

``shard`` is what :func:`accel_utils.dp_eval_sample_shard` returned: ``(rank, size)``, or None
when every rank scores every sample.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from accel_utils.topology import resolve

Shard = tuple[int, int]


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
        return samples.select(range(start, stop))
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


def gather_sharded_results(results: Any, shard: Shard | None, group: Any = None) -> list[Any]:
    """Every rank's per-sample results, back in the original sample order, on every rank.

    The inverse of :func:`shard_samples`: one ``all_gather_object`` over ``group``, then the
    parts are joined by shard index. Ranks that share a shard index (the ranks of one HSDP
    replica) contribute one copy; a rank with no samples takes part like any other, so nobody
    waits for it. An NCCL group gathers over its gloo side group (objects stay on the CPU).

    Args:
        results: this rank's results, one picklable item per sample of its shard.
        shard: the same ``(rank, size)`` (or None) that :func:`shard_samples` was given.
        group: the group every rank of the eval belongs to: None (the default group), an
            Accelerator, a PartialState, a ProcessGroup or a DeviceMesh.

    Returns:
        All results as one list; ``results`` unchanged when ``shard`` is None.

    Raises:
        ValueError: the ranks' shards do not cover ``range(size)`` or disagree on ``size``
            (raised on every rank alike).
    """
    if shard is None:
        unchanged: list[Any] = results  # what the caller passed, as documented
        return unchanged
    rank, size = _check_shard(shard)
    topo = resolve(group)
    part = list(results)
    if topo.group is None:
        return _merge([(rank, size, part)], size)
    gathered: list[Any] = [None] * topo.world_size
    dist.all_gather_object(gathered, (rank, size, part), group=_object_group(topo.group))
    return _merge(gathered, size)


def _object_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    # all_gather_object on NCCL moves pickles through GPU tensors; gloo keeps them on the CPU.
    if dist.get_backend(group) == "gloo":
        return group
    from accel_utils.barriers import _create_gloo_group

    side = _create_gloo_group(group)
    return side if side is not None else group  # none could be made (it warned): use the group


def _merge(entries: list[tuple[int, int, list[Any]]], size: int) -> list[Any]:
    parts: dict[int, list[Any]] = {}
    for index, their_size, part in entries:
        if their_size != size:
            raise ValueError(f"ranks disagree on the shard size ({their_size} vs {size})")
        parts.setdefault(index, part)
    missing = sorted(set(range(size)) - set(parts))
    if missing:
        raise ValueError(
            f"no rank of the group holds shard(s) {missing} of {size}: pass every rank's shard "
            "from dp_eval_sample_shard and a group that spans all of them"
        )
    return [item for index in range(size) for item in parts[index]]
