"""torchrun entry for the benchmarks that run inside one process group (1 to 3).

``torchrun --nproc_per_node N benchmarks/bench_worker.py CONFIG.json``; ``benchmarks/run.py``
writes the config and reads back the JSON that rank 0 writes to ``config["out"]``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import bench_first_rank
import bench_grad_accum
import bench_loss
import torch
import torch.distributed as dist
from bench_timing import rows, time_variants

import accel_utils
from accel_utils import resolve


def _accelerator(cfg: dict, backend: str) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(bucket_cap_mb=bench_grad_accum.bucket_mb(cfg["grad_accum"]))
    return Accelerator(cpu=backend == "gloo", gradient_accumulation_steps=cfg["grad_accum"]["k"],
                       kwargs_handlers=[ddp])


def run(cfg: dict) -> list[dict]:
    """Every suite named in ``cfg["suites"]``, as result records (the same on every rank)."""
    backend = cfg["backend"]
    topo = resolve()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", topo.nodes.local_rank)
        torch.cuda.set_device(device)
    gloo = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    accelerator = _accelerator(cfg, backend)
    builders = {
        "reduce_loss": lambda: bench_loss.variants(accelerator, device),
        "first_rank": lambda: bench_first_rank.variants(accelerator, gloo, topo.nodes.local_rank),
        "grad_accum": lambda: bench_grad_accum.variants(cfg["grad_accum"], accelerator, device),
    }
    records = []
    for suite in cfg["suites"]:
        started = time.perf_counter()
        variants = builders[suite]()
        reps = cfg["reps"][suite]
        samples = time_variants(variants, reps=reps["reps"], warmup=reps["warmup"],
                                device=device, sync_group=gloo)
        table = rows(variants, samples, reference="floor")
        if suite == "grad_accum":
            bench_grad_accum.finish(table)
        records.append({"benchmark": suite, "world_size": topo.world_size, "backend": backend,
                        "reference": "floor", "rows": table})
        if topo.is_main:
            sys.stderr.write(f"[bench] {suite} world={topo.world_size} {backend}: "
                             f"{time.perf_counter() - started:.1f}s\n")
    return records


def main(path: str) -> None:
    with open(path) as fh:
        cfg = json.load(fh)
    dist.init_process_group(cfg["backend"])
    records = run(cfg)
    if resolve().is_main:
        with open(cfg["out"], "w") as fh:
            json.dump(records, fh)
    accel_utils.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
