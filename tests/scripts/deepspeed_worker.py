"""One rank of a real DeepSpeed run on CPU (gloo), checked against a plain DDP reference.

Launched by tests/test_deepspeed.py, two processes:

* ``--mode raw``: ``deepspeed.initialize`` (DeepSpeed's own ``init_distributed``) for every stage
  in ``--stages``, AdamW (``torch_adam``);
* ``--mode accelerate``: ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(...))`` for every stage
  in ``--stages``, or, with ``--stages launch``, the plugin that ``accelerate launch
  --config_file`` describes; a torch SGD optimizer (its step is the gradient times the learning
  rate, so equal parameters mean equal gradients, which Adam's scale invariance would hide).

For each stage, ``K`` micro-batches per optimizer step run inside ``get_sync_ctx``; the same
micro-batches run through a DDP copy of the model on the same ranks. Each rank writes
``rank{N}.json`` into ``--out``: the largest gradient, loss and parameter differences to the
reference, what ``reduce_loss`` and ``dp_eval_sample_shard`` returned and the sharded and the
unsharded eval metric. The accelerate mode first builds its training data with a ``datasets``
map under ``FirstRankPerNode``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from accel_utils import (
    FirstRankPerNode,
    destroy_process_group,
    dp_eval_sample_shard,
    gather_sharded_results,
    get_sync_ctx,
    reduce_loss,
    shard_samples,
)

# DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce op (about a
# minute on 2 cores) in every init_distributed; only inference all-reduces (AutoTP) use it, never
# ZeRO training. Marked incompatible, DeepSpeed falls back to torch.distributed (gloo).
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

K = 2  # micro-batches per optimizer step
STEPS = 3
MICRO = 4  # samples per micro-batch
FEATURES = 6
EVAL_SAMPLES = 7  # odd: the two ranks' shards differ in size
ADAMW = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
SGD_LR = 0.1


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank, for engine and reference
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 1))


def samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    return x, x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=gen)


def full_param(param: torch.Tensor, stage: int) -> torch.Tensor:
    if stage == 0:  # no ZeRO partitioning: the module holds the whole parameter
        return param.detach().clone()
    return safe_get_full_fp32_param(param).detach().clone()  # a collective under ZeRO-3


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def expected_loss(loss_sum: float, tokens: int) -> tuple[float, int]:
    """The global loss sum and token count, gathered without accel_utils."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (loss_sum, tokens))
    return sum(g[0] for g in gathered), sum(g[1] for g in gathered)


def evaluate(engine: Any, shard: Any) -> tuple[float, int]:
    """Mean squared error over the eval samples (this rank's shard of them), and the forwards
    this rank ran: under ZeRO-3 each forward gathers parameters with the other ranks."""
    x, y = samples(EVAL_SAMPLES, seed=99)
    mine = shard_samples(list(range(EVAL_SAMPLES)), shard)
    engine.eval()
    with torch.no_grad():
        errors = [float((engine(x[i:i + 1]) - y[i:i + 1]).pow(2).sum()) for i in mine]
    engine.train()
    gathered = gather_sharded_results(errors, shard)
    return sum(gathered) / len(gathered), len(mine)


def eval_report(engine: Any, shard: Any) -> dict[str, Any]:
    sharded, forwards = evaluate(engine, shard)
    unsharded, _ = evaluate(engine, None)
    return {"shard": shard, "metric_sharded": sharded, "metric_unsharded": unsharded,
            "eval_forwards": forwards}


def ds_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": K,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {**ADAMW, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


def run_raw(stage: int) -> dict[str, Any]:
    model = build_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage))
    ref = DDP(build_model())
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {"stage": engine.zero_optimization_stage(), "inside_no_sync": False,
                           "grad_diff": 0.0, "loss_diff": 0.0, "reduce_loss": []}
    for step in range(STEPS):
        store, tokens = [], 0
        for micro in range(K):
            x, y = samples(MICRO, seed=1000 * step + 10 * micro + rank)  # this rank's data
            last = micro == K - 1
            with get_sync_ctx(engine, last):
                out["inside_no_sync"] |= engine.inside_no_sync_ctxt  # set by engine.no_sync()
                loss = F.mse_loss(engine(x), y)
                engine.backward(loss)  # DeepSpeed divides by K itself
            with get_sync_ctx(ref, last):
                ref_loss = F.mse_loss(ref(x), y)
                (ref_loss / K).backward()
            out["loss_diff"] = max(out["loss_diff"], abs(loss.item() - ref_loss.item()))
            if last:  # DeepSpeed's reduced gradient, before its step consumes it
                grads = [safe_get_full_grad(p) for p in engine.module.parameters()]
                out["grad_diff"] = max(out["grad_diff"],
                                       max_diff(grads, [p.grad for p in ref.parameters()]))
            engine.step()  # steps only at DeepSpeed's own accumulation boundary
            store.append(loss.detach() * len(x))
            tokens += len(x)
        got = reduce_loss(store, tokens, group=engine.data_parallel_group)
        want = expected_loss(float(sum(store)), tokens)
        out["reduce_loss"].append([[float(got[0]), int(got[1])], list(want)])
        ref_opt.step()
        ref_opt.zero_grad()
    out["param_diff"] = max_diff([full_param(p, stage) for p in engine.module.parameters()],
                                 [p.detach() for p in ref.parameters()])
    out["global_steps"] = engine.global_steps
    out.update(eval_report(engine, dp_eval_sample_shard(engine)))
    out["world"] = world
    return out


def mapped_dataset(out_dir: str, accelerator: Any) -> tuple[Any, int]:
    """The training data, made by a datasets map that only the node's first rank runs."""
    import datasets

    calls = 0

    def add_target(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        nonlocal calls
        calls += 1
        x = torch.tensor(batch["x"])
        return {"y": (x.sum(dim=1, keepdim=True).sin()).tolist()}

    x, _ = samples(K * STEPS * MICRO * 2, seed=7)  # two ranks' worth of micro-batches
    with FirstRankPerNode(accelerator):
        data = datasets.Dataset.from_dict({"x": x.tolist()}).map(
            add_target, batched=True, batch_size=None,
            cache_file_name=os.path.join(out_dir, "mapped.arrow"),
        )
    return data.with_format("torch"), calls


def accelerator_for(stage: int | None) -> Any:
    """A fresh DeepSpeed Accelerator: for ``stage``, or as ``accelerate launch`` configured it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per stage
    GradientState._reset_state()
    plugin = None
    if stage is not None:
        plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=K,
                                 gradient_clipping=0.0)
    # On a machine without GPUs Accelerate picks no backend for a DeepSpeed run and reports
    # one process per rank; naming gloo gives the real world size.
    return Accelerator(deepspeed_plugin=plugin,
                       kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def without_backend() -> dict[str, Any]:
    """A DeepSpeed Accelerator as most scripts build it, with no backend named: on CPU
    Accelerate then reports one process per rank; accel_utils must still see both."""
    import logging

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("accel_utils").addHandler(handler)
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=K))
    loss, tokens = reduce_loss([torch.ones(1)], 1, group=acc)
    out = {"num_processes": acc.num_processes, "shard": dp_eval_sample_shard(acc),
           "reduced": [float(loss), int(tokens)], "warnings": warnings}
    logging.getLogger("accel_utils").removeHandler(handler)
    return out


def run_accelerate(stage: int | None, data: Any) -> dict[str, Any]:
    acc = accelerator_for(stage)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    loader = torch.utils.data.DataLoader(data, batch_size=MICRO)
    engine, optimizer, loader = acc.prepare(model, optimizer, loader)
    ref = DDP(build_model())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=SGD_LR)
    out: dict[str, Any] = {"stage": engine.zero_optimization_stage(), "inside_no_sync": False,
                           "type": type(engine).__name__, "num_processes": acc.num_processes,
                           "loss_diff": 0.0, "param_diff": 0.0, "reduce_loss": [], "syncs": []}
    store: list[torch.Tensor] = []
    for batch in loader:
        x, y = batch["x"], batch["y"]
        with acc.accumulate(engine):  # under ZeRO-0/1 Accelerate itself enters engine.no_sync()
            before = engine.inside_no_sync_ctxt
            with get_sync_ctx(engine, None, group=acc):
                out["inside_no_sync"] |= engine.inside_no_sync_ctxt != before
                loss = F.mse_loss(engine(x), y)
                acc.backward(loss)  # engine.backward; engine.step() on the last micro-batch
                optimizer.step()
                optimizer.zero_grad()
        out["syncs"].append(acc.sync_gradients)
        with get_sync_ctx(ref, acc.sync_gradients):
            ref_loss = F.mse_loss(ref(x), y)
            (ref_loss / K).backward()
        out["loss_diff"] = max(out["loss_diff"], abs(loss.item() - ref_loss.item()))
        store.append(loss.detach() * len(x))
        if acc.sync_gradients:
            ref_opt.step()
            ref_opt.zero_grad()
            params = [full_param(p, out["stage"]) for p in engine.module.parameters()]
            out["param_diff"] = max(out["param_diff"],
                                    max_diff(params, [p.detach() for p in ref.parameters()]))
            tokens = MICRO * len(store)
            got = reduce_loss(store, tokens, group=acc)
            want = expected_loss(float(sum(store)), tokens)
            out["reduce_loss"].append([[float(got[0]), int(got[1])], list(want)])
            store = []
    out["global_steps"] = engine.global_steps
    out["shard_from_accelerator"] = dp_eval_sample_shard(acc)
    out.update(eval_report(engine, dp_eval_sample_shard(engine)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("raw", "accelerate"), required=True)
    parser.add_argument("--stages", default="0,1,2,3", help="comma-separated, or 'launch'")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    stages: list[int | None] = (
        [None] if args.stages == "launch" else [int(s) for s in args.stages.split(",")]
    )
    report: dict[str, Any] = {"stages": {}}
    if args.mode == "raw":
        for stage in stages:
            assert stage is not None
            report["stages"][str(stage)] = run_raw(stage)
    else:
        if stages != [None]:  # a plain torchrun: no launcher configured Accelerate
            report["without_backend"] = without_backend()
        data, report["map_calls"] = mapped_dataset(args.out, accelerator_for(stages[0]))
        for stage in stages:
            result = run_accelerate(stage, data)
            report["stages"][str(result["stage"])] = result
    rank = dist.get_rank()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    sys.stdout.write(f"DEEPSPEED_WORKER rank={rank} ok\n")
    destroy_process_group()


if __name__ == "__main__":
    main()
