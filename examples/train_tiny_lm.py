"""Fine-tune a tiny causal LM with gradient accumulation: the accel-utils main job.

A Llama-style model built from a ``transformers`` config (random weights, nothing downloaded)
learns arithmetic token sequences from a ``datasets`` dataset generated and tokenised here; the
first rank of each node prepares the dataset while the others wait, then load it. Each optimizer
step accumulates ``--grad-accum`` micro-batches inside ``get_sync_ctx`` (one gradient
reduction per step) and normalises by the global token count that ``reduce_loss`` returns (one
collective per step).

    torchrun --nproc_per_node 2 examples/train_tiny_lm.py [--fsdp2 | --deepspeed 3] [--steps 30]
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29501 examples/train_tiny_lm.py [--fsdp2]
    accelerate launch --config_file examples/accelerate_deepspeed.yaml examples/train_tiny_lm.py

DeepSpeed ZeRO (``--deepspeed STAGE``, or an ``accelerate launch`` DeepSpeed config such as
examples/accelerate_deepspeed.yaml) runs through ``Accelerator(deepspeed_plugin=...)``: DeepSpeed
divides by the micro-batch count, averages over ranks and steps at the last micro-batch itself,
so each micro-batch's loss is scaled by the step's global token count up front.

Without a GPU per process the script runs on CPU (``Accelerator(cpu=True)``, gloo); with one GPU
per process it runs unchanged on them (NCCL). The main process shows a progress bar and ends
with one line:
``SUMMARY steps=.. tokens=.. first_loss=.. final_loss=.. tokens_per_s=..``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, load_from_disk
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from accel_utils import (
    FirstRankPerNode,
    HangWatch,
    destroy_process_group,
    get_sync_ctx,
    reduce_loss,
)
from accel_utils.topology import launcher_env

PAD = 0
VOCAB = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=32, help="longest sequence")
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--deepspeed", type=int, choices=(0, 1, 2, 3), default=None,
                        help="train with DeepSpeed at this ZeRO stage instead of DDP (also "
                        "selected by an `accelerate launch` DeepSpeed config)")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="HangWatch: seconds without progress that make a stall report")
    parser.add_argument("--straggle", type=int, default=None, metavar="RANK",
                        help="demo: this rank sleeps 3 x --stall in step 2's data phase, and "
                             "HangWatch names it")
    parser.add_argument("--cache-dir",
                        default=os.path.join(tempfile.gettempdir(), "accel_utils_examples"),
                        help="where the tokenised dataset is kept (node-local is fine)")
    return parser.parse_args()


def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    return {"input_ids": [[int(tok) for tok in text.split()] for text in batch["text"]]}


def build_dataset(args: argparse.Namespace) -> None:
    """Generate "text" of arithmetic sequences, tokenise and save it: the once-per-node part."""
    g = torch.Generator().manual_seed(args.seed)
    texts = []
    for _ in range(args.num_samples):
        length = int(torch.randint(args.seq_len // 2, args.seq_len + 1, (), generator=g))
        start, step = (int(x) for x in torch.randint(1, 8, (2,), generator=g))
        texts.append(" ".join(str(1 + (start + i * step) % (VOCAB - 1)) for i in range(length)))
    dataset = Dataset.from_dict({"text": texts})
    dataset = dataset.map(tokenize, batched=True, remove_columns=["text"])
    path = dataset_path(args)
    tmp = f"{path}.tmp{os.getpid()}"
    dataset.save_to_disk(tmp)
    try:
        os.replace(tmp, path)  # atomic: a reader never sees half a dataset
    except OSError:  # another job saved it first
        shutil.rmtree(tmp, ignore_errors=True)


def dataset_path(args: argparse.Namespace) -> str:
    return os.path.join(args.cache_dir, f"tiny_lm_n{args.num_samples}_l{args.seq_len}_s{args.seed}")


def load_dataset(args: argparse.Namespace, accelerator: Accelerator) -> Dataset:
    os.makedirs(args.cache_dir, exist_ok=True)
    # Each node's first rank builds the node-local cache while the others wait; if it fails,
    # every rank raises FirstRankFailedError instead of hanging or reading half a dataset.
    with FirstRankPerNode(accelerator) as first:
        if first and not os.path.isdir(dataset_path(args)):
            build_dataset(args)
    return load_from_disk(dataset_path(args))


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    labels = ids.masked_fill(ids == PAD, -100)  # padding carries no loss: uneven token counts
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
        pad_token_id=PAD, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def shard_fsdp2(model: LlamaForCausalLM, accelerator: Accelerator) -> LlamaForCausalLM:
    """FSDP2 per decoder layer, then the root, with torch's API (Accelerate 1.15 silently ignores
    its FSDP plugin on CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    model.to(accelerator.device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's real tokens (normalised later, globally)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def use_cpu() -> bool:
    """CPU (gloo) unless each process on this node gets a GPU of its own (NCCL cannot share one)."""
    return torch.cuda.device_count() < int(launcher_env().get("LOCAL_WORLD_SIZE", "1"))


def ddp_micro_batches(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]]
                      ) -> list[torch.Tensor]:
    """Forward and backward of one step's micro-batches; the gradients then hold loss sums."""
    store = []
    for micro, batch in enumerate(micro_batches):
        # forward and backward inside the context: only the last micro-batch syncs gradients
        with get_sync_ctx(model, micro == len(micro_batches) - 1):
            loss = loss_sum(model, batch)
            loss.backward()
        store.append(loss.detach())
    return store


# --8<-- [start:deepspeed]
def deepspeed_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator running DeepSpeed: ZeRO ``--deepspeed``, or as accelerate launch set it."""
    from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    handlers = []
    if use_cpu():
        import deepspeed

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a minute on 2 cores,
        # and a build killed half-way leaves a lock every later launch waits on forever); only
        # AutoTP inference uses it. Marked incompatible, DeepSpeed uses torch.distributed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Accelerate names no backend for DeepSpeed without GPUs and would report 1 process
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    plugin = None
    if args.deepspeed is not None:
        plugin = DeepSpeedPlugin(zero_stage=args.deepspeed,
                                 gradient_accumulation_steps=args.grad_accum)
    # the step boundary is every grad_accum-th micro-batch, never the end of an epoch
    steps = GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False)
    return Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers,
                       gradient_accumulation_plugin=steps)


def deepspeed_micro_batches(accelerator: Accelerator, model: torch.nn.Module,
                            micro_batches: list[dict[str, torch.Tensor]], tokens: int
                            ) -> list[torch.Tensor]:
    """The same step under DeepSpeed, which steps the optimizer inside the last backward: the
    global token count is needed before it, to scale each loss to the global per-token mean."""
    global_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
    # DeepSpeed divides each micro-batch's gradient by their count and averages over ranks
    scale = accelerator.num_processes * len(micro_batches) / global_tokens
    store = []
    for batch in micro_batches:
        # get_sync_ctx is a null context here: DeepSpeed handles the boundary itself
        with accelerator.accumulate(model), get_sync_ctx(model, None, group=accelerator):
            loss = loss_sum(model, batch)
            accelerator.backward(loss * scale)
        store.append(loss.detach())
    return store
# --8<-- [end:deepspeed]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)  # HangWatch's stall reports are warnings
    use_deepspeed = (args.deepspeed is not None
                     or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")
    accelerator = deepspeed_accelerator(args) if use_deepspeed else Accelerator(cpu=use_cpu())
    set_seed(args.seed)  # the same initial weights on every rank
    dataset = load_dataset(args, accelerator)
    model = build_model(args)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                        drop_last=True)
    if args.fsdp2:
        model = shard_fsdp2(model, accelerator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if use_deepspeed and model.gradient_accumulation_steps() != args.grad_accum:
        raise SystemExit(  # DeepSpeed would divide by its own count and step on its own boundary
            f"the DeepSpeed config accumulates {model.gradient_accumulation_steps()} micro-batches "
            f"per step but --grad-accum is {args.grad_accum}: make them equal"
        )
    model.train()
    bar = tqdm(total=args.steps, desc="train", disable=not accelerator.is_main_process,
               file=sys.stderr)
    start = time.perf_counter()
    watch = HangWatch(accelerator, stall=args.stall)
    with watch:
        losses, total_tokens = train(args, accelerator, model, optimizer, loader, watch, bar,
                                     use_deepspeed)
    elapsed = time.perf_counter() - start
    bar.close()
    if accelerator.is_main_process:
        sys.stdout.write(
            f"SUMMARY steps={args.steps} tokens={total_tokens} first_loss={losses[0]:.4f} "
            f"final_loss={losses[-1]:.4f} tokens_per_s={total_tokens / elapsed:.0f}\n"
        )
    destroy_process_group()  # barrier, then teardown: two-process jobs otherwise abort at exit


def train(args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, loader: DataLoader, watch: HangWatch,
          bar: tqdm, use_deepspeed: bool) -> tuple[list[float], int]:
    """The training loop: ``args.steps`` optimizer steps; the losses and the token count."""
    batches = iter(())
    losses: list[float] = []
    total_tokens = 0
    for step in range(args.steps):
        watch.step("data")
        if step == 2 and accelerator.process_index == args.straggle:
            time.sleep(3 * args.stall)  # the demo's straggler: HangWatch names this line
        micro_batches = []
        for _micro in range(args.grad_accum):
            batch = next(batches, None)
            if batch is None:  # a new epoch
                batches = iter(loader)
                batch = next(batches)
            micro_batches.append(batch)
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        watch.phase("forward-backward")
        if use_deepspeed:
            store = deepspeed_micro_batches(accelerator, model, micro_batches, tokens)
        else:
            store = ddp_micro_batches(model, micro_batches)
        watch.phase("reduce")
        loss_total, denom = reduce_loss(store, tokens, dp_group=accelerator)
        watch.phase("optimizer")
        if not use_deepspeed:  # DeepSpeed stepped inside the last backward
            # DDP and FSDP2 average gradients over ranks; turn that into the global per-token mean
            scale = accelerator.num_processes / denom.item()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            optimizer.step()
            optimizer.zero_grad()
        losses.append((loss_total / denom).item())
        total_tokens += int(denom)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, total_tokens


if __name__ == "__main__":
    main()
