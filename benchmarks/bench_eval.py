"""Benchmark 4: a generation-based eval of a tiny causal LM, sharded or not.

``torchrun --nproc_per_node 2 benchmarks/bench_eval.py CONFIG.json`` scores the samples sharded
with ``dp_eval_sample_shard``; ``python benchmarks/bench_eval.py CONFIG.json`` (no process group)
is one process scoring everything. Each timed repetition runs from a barrier to the gathered
results; rank 0 writes the times (slowest rank) and the accuracy to ``config["out"]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import accel_utils
from accel_utils import dp_eval_sample_shard, gather_sharded_results, resolve, shard_samples

PAD = 0


def make_model(cfg: dict) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=2 * cfg["hidden"],
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_samples(cfg: dict) -> list[dict[str, list[int]]]:
    """Prompts of 8 to 24 tokens, each with an expected continuation (same on every rank)."""
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(cfg["samples"]):
        length = int(torch.randint(8, 25, (1,), generator=gen))
        prompt = torch.randint(3, cfg["vocab"], (length,), generator=gen).tolist()
        answer = torch.randint(3, cfg["vocab"], (cfg["new_tokens"],), generator=gen).tolist()
        samples.append({"prompt": prompt, "answer": answer})
    return samples


def generate(model: torch.nn.Module, sample: dict, new_tokens: int) -> list[int]:
    """The greedy continuation of one prompt."""
    ids = torch.tensor([sample["prompt"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    return out[0, ids.shape[1]:].tolist()


def evaluate(model: torch.nn.Module, samples: list[dict], new_tokens: int) -> list[list[int]]:
    """Generate for this rank's shard of ``samples``; every continuation, in sample order."""
    shard = dp_eval_sample_shard("ddp")
    mine = shard_samples(samples, shard)
    with torch.inference_mode():
        outputs = [generate(model, s, new_tokens) for s in mine]
    return gather_sharded_results(outputs, shard)


def accuracy(samples: list[dict], outputs: list[list[int]]) -> float:
    """Mean token accuracy of the continuations against the expected answers."""
    hits = sum(a == b for s, out in zip(samples, outputs, strict=True)
               for a, b in zip(out, s["answer"], strict=False))  # outputs may be short
    return hits / sum(len(s["answer"]) for s in samples)


def main(path: str) -> None:
    with open(path) as fh:
        cfg = json.load(fh)
    torch.set_num_threads(cfg["threads"])
    if cfg["sharded"]:
        dist.init_process_group("gloo")
    model, samples = make_model(cfg), make_samples(cfg)
    times = []
    for rep in range(cfg["warmup"] + cfg["reps"]):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        outputs = evaluate(model, samples, cfg["new_tokens"])
        if rep >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if resolve().is_main:
        result: dict[str, Any] = {
            "times": slowest.tolist(), "accuracy": accuracy(samples, outputs),
            "scored": len(outputs),
            "outputs_sha1": hashlib.sha1(json.dumps(outputs).encode()).hexdigest(),
            "processes": resolve().world_size, "threads_per_process": torch.get_num_threads(),
        }
        with open(cfg["out"], "w") as fh:
            json.dump(result, fh)
    accel_utils.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
