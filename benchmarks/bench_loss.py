"""Benchmark 1: reducing a loss and its denominator over the data-parallel group.

Floor: one all-reduce of a 2-element tensor, the least any correct reduction can do.
Peers: the seed's shape (two all-reduces, loss then denominator) and ``Accelerator.reduce``
called on the loss and on the denominator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from bench_timing import Variant

INNER = 20  # calls per timed block: short blocks, many rotations, noise hits all alike

MICRO_BATCHES = 8  # losses in loss_store, as after 8 accumulation steps


def seed_reduce_loss(
    loss_store: list[torch.Tensor], total_num_tokens: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's shape: sum the losses, then one all-reduce each for loss and denominator."""
    loss = torch.sum(torch.stack(loss_store).float()).view(1).clone().detach()
    dist.all_reduce(loss, group=group)
    denominator = total_num_tokens.clone().detach().to(torch.int)
    dist.all_reduce(denominator, group=group)
    return loss, denominator


def variants(accelerator: Any, device: torch.device) -> list[Variant]:
    """The floor, accel-utils' reduce_loss and its peers, on the default group."""
    group = dist.group.WORLD
    floor = torch.zeros(2, device=device)
    losses = [torch.tensor(2.0 + i / 10, device=device) for i in range(MICRO_BATCHES)]
    tokens = torch.tensor(4096, dtype=torch.int64, device=device)
    out = [
        Variant("floor", "floor: all_reduce of 2 elements", lambda: dist.all_reduce(floor), INNER),
        Variant("seed", "seed shape: 2 all-reduces",
                lambda: seed_reduce_loss(losses, tokens, group), INNER),
        Variant("accelerate", "Accelerator.reduce x2",
                lambda: _accelerate_reduce(accelerator, losses, tokens), INNER),
    ]
    try:
        from accel_utils import reduce_loss
    except (ImportError, AttributeError):
        return out  # not landed yet: the suite still runs its peers
    out.insert(1, Variant("accel_utils", "accel_utils.reduce_loss (default group)",
                          lambda: reduce_loss(losses, tokens), INNER))
    out.insert(2, Variant("accel_utils_acc", "accel_utils.reduce_loss(dp_group=accelerator)",
                          lambda: reduce_loss(losses, tokens, dp_group=accelerator), INNER))
    return out


def _accelerate_reduce(accelerator: Any, losses: list[torch.Tensor], tokens: torch.Tensor) -> None:
    loss = torch.stack(losses).sum()
    accelerator.reduce(loss, reduction="sum")
    accelerator.reduce(tokens, reduction="sum")
