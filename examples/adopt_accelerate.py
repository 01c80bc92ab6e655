"""A tiny causal LM trained with Accelerate: preprocessing, gradient accumulation, generation eval.

``docs/snippets/adopt_accelerate_before.py`` is the script written the Accelerate way;
``examples/adopt_accelerate.py`` is the same script moved onto accel-utils by the diff in
``docs/snippets/adopt_accelerate.diff``: the first rank of each node preprocesses, accumulation
runs in ``get_sync_ctx``, the logged loss comes from ``reduce_loss`` and the generation eval is
sharded with ``dp_eval_sample_shard``. Both run with no arguments (random weights, generated
data, nothing downloaded), on CPU (gloo) or one GPU per process (NCCL):

    torchrun --nproc_per_node 2 examples/adopt_accelerate.py
    python examples/adopt_accelerate.py

Every rank prints ``DATA rank <r> built|loaded``; rank 0 prints ``METRICS {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch
from accelerate import Accelerator
from datasets import Dataset, disable_progress_bars, load_from_disk
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from accel_utils import (
    FirstRankPerNode,
    destroy_process_group,
    dp_eval_sample_shard,
    gather_sharded_results,
    get_sync_ctx,
    reduce_loss,
    shard_samples,
)

VOCAB, LENGTH, PROMPT = 24, 8, 5  # arithmetic sequences; generate the last 3 of 8 tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--cache-dir", help="where the datasets are kept (default: a temp dir)",
                        default=os.path.join(tempfile.gettempdir(), "accel_utils_adopt"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_or_load(path: str, n: int, seed: int) -> tuple[Dataset, str]:
    """The preprocessing: generate and save the dataset, or load it if it was saved before."""
    if os.path.isdir(path):
        return load_from_disk(path), "loaded"
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    ids = ((start + step * torch.arange(LENGTH)) % VOCAB).tolist()
    tmp = f"{path}.tmp{os.getpid()}"
    Dataset.from_dict({"input_ids": ids}).save_to_disk(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another node saved it first (a shared directory)
        shutil.rmtree(tmp)
    return load_from_disk(path), "built"


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids}


def continuation_accuracy(model: LlamaForCausalLM, rows: list[dict], synced: bool) -> list[float]:
    """Per row: the share of the last tokens that greedy generation gets right."""
    prompts = torch.tensor([row["input_ids"][:PROMPT] for row in rows], device=model.device)
    out = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=LENGTH - PROMPT,
        min_new_tokens=LENGTH - PROMPT, do_sample=False, pad_token_id=0, synced_gpus=synced,
    )
    targets = torch.tensor([row["input_ids"][PROMPT:] for row in rows], device=model.device)
    return (out[:, PROMPT:] == targets).float().mean(dim=1).tolist()


def main() -> None:
    args = parse_args()
    disable_progress_bars()
    # CPU (gloo) unless every process of this node has a GPU of its own
    cpu = torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=args.grad_accum)
    os.makedirs(args.cache_dir, exist_ok=True)
    path = os.path.join(args.cache_dir, f"v1-{VOCAB}-{LENGTH}-seed{args.seed}")
    with FirstRankPerNode(accelerator):
        train, how = build_or_load(f"{path}-train", 512, args.seed)
        evaluation, _ = build_or_load(f"{path}-eval", 32, args.seed + 1)
    print(f"DATA rank {accelerator.process_index} {how}", flush=True)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    micro_losses: list[torch.Tensor] = []
    step_losses: list[float] = []
    for i, batch in enumerate(loader):
        is_optim_step = (i + 1) % args.grad_accum == 0
        with get_sync_ctx(model, is_optim_step):
            loss = model(**batch).loss
            accelerator.backward(loss)
        if is_optim_step:
            optimizer.step()
            optimizer.zero_grad()
        micro_losses.append(loss.detach())
        if is_optim_step:
            total, count = reduce_loss(micro_losses, 0, per_token_loss=False, dp_group=accelerator)
            step_losses.append((total / count).item())
            micro_losses = []
            if len(step_losses) == args.steps:
                break

    model.eval()
    shard = dp_eval_sample_shard(accelerator)  # None under FSDP/TP: every rank, in lockstep
    rows = list(shard_samples(evaluation, shard))
    synced = shard is None and accelerator.num_processes > 1
    mine: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch_rows = rows[start:start + 8]
            mine += continuation_accuracy(accelerator.unwrap_model(model), batch_rows, synced)
    scores = gather_sharded_results(mine, shard, group=accelerator)
    if accelerator.is_main_process:
        print("METRICS " + json.dumps({
            "step_losses": step_losses, "eval_accuracy": sum(scores) / len(scores),
            "eval_samples": len(scores), "world_size": accelerator.num_processes,
        }), flush=True)
    # drop what holds the process group (the DDP model), or the exit may hang or abort
    model, optimizer, loader = accelerator.free_memory(model, optimizer, loader)
    destroy_process_group()


if __name__ == "__main__":
    main()
