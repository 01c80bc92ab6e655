"""Benchmark 3: one optimizer step of gradient accumulation (K micro-batches) under DDP.

Floor: ``no_sync()`` written by hand on the first K-1 micro-batches. Peers: syncing every
micro-batch, and ``Accelerator.accumulate``. A DDP comm hook counts the gradient all-reduces of
every step; DDP gets one bucket as large as the model so that one all-reduce is one sync.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from bench_timing import Variant
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP


def make_model(width: int, layers: int, device: torch.device) -> nn.Module:
    """An MLP of ``layers`` square linear layers (1024 x 10 is about 10.5M parameters)."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks).to(device)


def bucket_mb(cfg: dict) -> float:
    """A DDP bucket size that holds every float32 gradient (one all-reduce per sync)."""
    return 2 * cfg["layers"] * (cfg["width"] ** 2 + cfg["width"]) * 4 / 2**20


def count_allreduces(ddp: nn.Module, group: dist.ProcessGroup) -> list[int]:
    """Register a comm hook on ``ddp`` that counts its gradient all-reduces into the list."""
    counter = [0]

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
        counter[0] += 1
        return default_hooks.allreduce_hook(group, bucket)

    ddp.register_comm_hook(None, hook)
    return counter


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    k: int,
    context: Callable[[int], Any],
    backward: Callable[[torch.Tensor], None],
    counter: list[int],
    per_step: list[int],
) -> None:
    before = counter[0]
    for i in range(k):
        with context(i):
            loss = model(batch).square().mean()
            backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    per_step.append(counter[0] - before)


def variants(cfg: dict, accelerator: Any, device: torch.device) -> list[Variant]:
    """The floor, accel-utils' get_sync_ctx and its peers, each doing one optimizer step."""
    k, width, layers, rows = cfg["k"], cfg["width"], cfg["layers"], cfg["rows"]
    group = dist.group.WORLD
    plain = make_model(width, layers, device)
    params = sum(p.numel() for p in plain.parameters())
    ddp = DDP(plain, bucket_cap_mb=bucket_mb(cfg), device_ids=_ids(device))
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-6)
    acc_plain = make_model(width, layers, device)
    acc_opt = torch.optim.SGD(acc_plain.parameters(), lr=1e-6)
    acc_model, acc_opt = accelerator.prepare(acc_plain, acc_opt)
    ddp_count = count_allreduces(ddp, group)
    acc_count = count_allreduces(acc_model, group)
    batch = torch.randn(rows, width, device=device)
    counts: dict[str, list[int]] = {}

    def backward(loss: torch.Tensor) -> None:
        (loss / k).backward()

    def make(key: str, context: Callable[[int], Any]) -> Callable[[], None]:
        per_step = counts.setdefault(key, [])
        return lambda: _step(ddp, opt, batch, k, context, backward, ddp_count, per_step)

    def accelerate_step() -> None:
        per_step = counts.setdefault("accelerate", [])
        _step(acc_model, acc_opt, batch, k, lambda i: accelerator.accumulate(acc_model),
              accelerator.backward, acc_count, per_step)

    out = [
        Variant("floor", "floor: no_sync() by hand on K-1 micro-batches",
                make("floor", lambda i: ddp.no_sync() if i < k - 1 else nullcontext())),
        Variant("every", "sync every micro-batch", make("every", lambda i: nullcontext())),
        Variant("accelerate", "Accelerator.accumulate", accelerate_step),
    ]
    try:
        from accel_utils import get_sync_ctx
    except (ImportError, AttributeError):
        pass
    else:
        out.insert(1, Variant("accel_utils", "accel_utils.get_sync_ctx",
                              make("accel_utils", lambda i: get_sync_ctx(ddp, i == k - 1))))
    for v in out:
        v.extra.update(params=params, k=k, allreduce_counts=counts.setdefault(v.key, []))
    return out


def _ids(device: torch.device) -> list[int] | None:
    return [device.index] if device.type == "cuda" else None


def finish(rows: list[dict]) -> None:
    """Replace each row's per-step count list by the counts after warm-up (min and max)."""
    for row in rows:
        steps = row.pop("allreduce_counts")[-row["n"]:]
        row["allreduces_per_step"] = [min(steps), max(steps)] if steps else None
