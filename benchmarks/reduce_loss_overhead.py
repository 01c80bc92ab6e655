"""Per-call cost of reduce_loss next to one bare all-reduce and the seed's two all-reduces.

Run on 2 processes (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node 2 benchmarks/reduce_loss_overhead.py [--rounds 30] [--calls 200]

The three variants run interleaved, round by round in rotating order, so that drift of the
machine affects them alike; rank 0 prints one JSON line with the median per-call time of each
(microseconds) and the ratios to the bare all-reduce.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from accel_utils import destroy_process_group, reduce_loss


def seed_reduce_loss(loss_store, total_num_tokens, per_token_loss=True, dp_group=None):
    """The seed's implementation (two collectives), with its hard-coded CUDA made portable."""
    loss = torch.sum(torch.stack(loss_store).float()).view(1).clone().detach()
    if per_token_loss:
        denominator = total_num_tokens.clone().detach().to(torch.int)
    else:
        denominator = torch.tensor([len(loss_store)], dtype=torch.int, device=loss.device)
    if dp_group is not None:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=dp_group)
        dist.all_reduce(denominator, op=dist.ReduceOp.SUM, group=dp_group)
    return loss, denominator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200, help="calls per variant per round")
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    losses = [torch.rand((), device=device) for _ in range(args.micro_batches)]
    tokens = torch.tensor(1000 + dist.get_rank(), device=device)
    bare = torch.zeros(2, device=device)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)

    variants = {
        "bare_all_reduce": lambda: dist.all_reduce(bare, group=group),
        "reduce_loss": lambda: reduce_loss(losses, tokens, dp_group=group),
        "seed_two_all_reduces": lambda: seed_reduce_loss(losses, tokens, dp_group=group),
    }
    names = list(variants)
    for fn in variants.values():  # warm-up: caches, connections, allocator
        for _ in range(50):
            fn()
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = variants[name]
            sync()
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            sync()
            per_call[name].append((time.perf_counter() - start) / args.calls * 1e6)

    medians = {name: statistics.median(v) for name, v in per_call.items()}
    if dist.get_rank() == 0:
        base = medians["bare_all_reduce"]
        report = {
            "world_size": dist.get_world_size(),
            "backend": backend,
            "us_per_call": {k: round(v, 2) for k, v in medians.items()},
            "ratio_to_bare": {k: round(v / base, 3) for k, v in medians.items()},
        }
        sys.stdout.write("REDUCE_LOSS_OVERHEAD " + json.dumps(report) + "\n")
    destroy_process_group()


if __name__ == "__main__":
    main()
