"""Interleaved timing of several variants inside one process group.

Variants are timed in blocks, taking turns in a new random order every repetition (the same order
on every rank), so that noise from a shared machine hits all of them alike, no variant always
follows the same one, and ratios stay meaningful. Every rank times every
block; a block's time is the slowest rank's (a collective is done when its last rank is done), and
a variant's figure is the median over repetitions after warm-up.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Variant:
    """One way of doing the benchmarked thing.

    Attributes:
        key: stable identifier, used in the JSON and the chart.
        label: what the Markdown table shows.
        call: does the thing once; ``inner`` calls make one timed block.
        inner: calls per timed block (slow variants use fewer).
        extra: anything else worth reporting (counts, settings).
    """

    key: str
    label: str
    call: Callable[[], Any]
    inner: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device, group: dist.ProcessGroup | None) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier(group=group)


def time_variants(
    variants: list[Variant],
    *,
    reps: int,
    warmup: int,
    device: torch.device,
    sync_group: dist.ProcessGroup | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per repetition, slowest rank per sample.

    Args:
        variants: what to time; each runs ``inner`` times per block.
        reps: timed repetitions (blocks) per variant.
        warmup: untimed repetitions per variant first.
        device: where the work runs (CUDA work is synchronised before a block ends).
        sync_group: group for the barrier between blocks (a gloo group; None = default group).

    Returns:
        ``{key: [seconds per call, ...]}`` with ``reps`` samples each, identical on every rank.
    """
    samples: dict[str, list[float]] = {v.key: [] for v in variants}
    order = random.Random(0)  # seeded alike on every rank: the collectives must match
    for rep in range(warmup + reps):
        for variant in order.sample(variants, len(variants)):
            _sync(device, sync_group)
            start = time.perf_counter()
            for _ in range(variant.inner):
                variant.call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = (time.perf_counter() - start) / variant.inner
            if rep >= warmup:
                samples[variant.key].append(elapsed)
    return _slowest_rank(samples, sync_group)


def _slowest_rank(samples: dict[str, list[float]], group: dist.ProcessGroup | None) -> dict:
    if not dist.is_initialized():
        return samples
    keys = sorted(samples)
    mine = torch.tensor([samples[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)  # on the gloo group: CPU tensor
    return {k: row.tolist() for k, row in zip(keys, mine, strict=True)}


def summarize(times: list[float]) -> dict[str, float]:
    """Median and quartiles of a list of seconds."""
    if len(times) == 1:
        return {"median_s": times[0], "p25_s": times[0], "p75_s": times[0], "n": 1}
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median_s": statistics.median(times), "p25_s": q1, "p75_s": q3, "n": len(times)}


def rows(
    variants: list[Variant], samples: dict[str, list[float]], reference: str,
    paired: bool = True,
) -> list[dict[str, Any]]:
    """One result row per variant, with its ratio to the reference variant.

    Args:
        variants: the variants, in table order.
        samples: seconds per call, one list per variant key.
        reference: the key of the variant that the ratios are relative to.
        paired: sample i of every variant comes from the same repetition (timed moments
            apart): the ratio is then the median of the per-repetition ratios, which cancels
            the machine's slower and faster phases. Otherwise the ratio of the medians.
    """
    ref = samples[reference]
    out = []
    for v in variants:
        mine = samples[v.key]
        stats = summarize(mine)
        if paired:
            ratio = statistics.median(a / b for a, b in zip(mine, ref, strict=True))
        else:
            ratio = stats["median_s"] / statistics.median(ref)
        out.append({"key": v.key, "label": v.label, **stats, "ratio": ratio,
                    "paired": paired, "samples_s": mine, **v.extra})
    return out
