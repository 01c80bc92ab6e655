"""Train and evaluate a tiny causal LM with a transformers.Trainer subclass built on accel-utils.

    torchrun --nproc_per_node 2 examples/trainer_subclass.py     # 2 processes (gloo on CPU)
    python examples/trainer_subclass.py                          # 1 process: the same metrics

The task: continue arithmetic sequences (s, s+d, s+2d, ... mod VOCAB). The subclass prepares its
datasets under FirstRankPerNode through the Trainer's own accelerator (the first rank of each
node builds and saves them, the others load them) and adds a generation metric to evaluate():
the share of continuation tokens that greedy ``model.generate`` gets right, scored on disjoint
shards under DDP (dp_eval_sample_shard on the Trainer's accelerator) and gathered back in sample
order (gather_sharded_results). Rank 0 prints one line ``METRICS {json}``; every rank prints
``DATA rank <r> built|loaded``.

Runs on transformers 4.57.1 to 5.x with accelerate 1.3 or newer (the ``examples`` extra): the
Trainer of both lines calls ``Accelerator.unwrap_model(keep_torch_compile=...)``, new in 1.3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch
from datasets import Dataset, disable_progress_bars, load_from_disk
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from accel_utils import destroy_process_group
from accel_utils.integrations.trainer import ShardedGenerationEvalMixin
from accel_utils.topology import launcher_env

VOCAB, LENGTH, PROMPT = 24, 8, 5
GLOBAL_BATCH = 16


class SequenceTrainer(ShardedGenerationEvalMixin, Trainer):
    """A Trainer whose evaluate() also reports ``eval_continuation_accuracy``.

    Generation runs in batches of ``args.per_device_eval_batch_size``, as the loss eval does.
    """

    def generation_step(
        self, model: torch.nn.Module, samples: list[dict], **generate_kwargs
    ) -> list[float]:
        prompts = torch.tensor([s["input_ids"][:PROMPT] for s in samples])
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=LENGTH - PROMPT,
            min_new_tokens=LENGTH - PROMPT, do_sample=False, pad_token_id=0, **generate_kwargs,
        )
        targets = torch.tensor([s["input_ids"][PROMPT:] for s in samples])
        return (out[:, PROMPT:] == targets).float().mean(dim=1).tolist()

    def generation_metrics(self, results: list[float]) -> dict[str, float]:
        accuracy = sum(results) / len(results)
        return {"continuation_accuracy": accuracy, "generation_samples": len(results)}


def sequences(n: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    ids = ((start + step * torch.arange(LENGTH)) % VOCAB).tolist()
    return Dataset.from_dict({"input_ids": ids}).map(
        lambda row: {"labels": row["input_ids"], "attention_mask": [1] * LENGTH}
    )


def build_or_load(path: str, n: int, seed: int) -> tuple[Dataset, str]:
    if os.path.isdir(path):
        return load_from_disk(path), "loaded"
    data = sequences(n, seed)
    data.save_to_disk(path)
    return data, "built"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_dir = os.path.join(tempfile.gettempdir(), "accel_utils_trainer_subclass")
    parser.add_argument("--output-dir", default=default_dir)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    disable_progress_bars()

    launched = "WORLD_SIZE" in launcher_env()  # torchrun / accelerate launch, else one process
    # Training samples in order, so one process and two see the same batches: transformers 5
    # has an argument for it; 4.57 lacks it, and its seeded shuffle is the same on any number
    # of processes already.
    in_order = {"train_sampling_strategy": "sequential"}
    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        in_order = {}
    training = TrainingArguments(
        output_dir=args.output_dir, use_cpu=True, ddp_backend="gloo" if launched else None,
        ddp_find_unused_parameters=False, report_to=[], max_steps=args.steps, learning_rate=3e-3,
        per_device_eval_batch_size=8, logging_strategy="no", save_strategy="no",
        eval_strategy="no", seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
        **in_order,
    )
    # the same global batch, and so the same updates, on any number of processes
    training.per_device_train_batch_size = GLOBAL_BATCH // training.world_size
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    trainer = SequenceTrainer(
        model=LlamaForCausalLM(config), args=training, data_collator=default_data_collator
    )
    data_dir = os.path.join(args.output_dir, f"data-v1-{VOCAB}-{LENGTH}-seed{args.seed}")
    train, how = trainer.prepare_dataset(lambda: build_or_load(f"{data_dir}-train", 640, args.seed))
    trainer.eval_dataset, _ = trainer.prepare_dataset(
        lambda: build_or_load(f"{data_dir}-eval", 24, args.seed + 1)
    )
    trainer.train_dataset = train
    trainer.generation_samples = trainer.eval_dataset
    sys.stdout.write(f"DATA rank {trainer.args.process_index} {how}\n")

    trainer.train()
    metrics = trainer.evaluate()
    logged = trainer.state.log_history[-1]  # what the Trainer's callbacks were given
    if trainer.args.process_index == 0:
        keep = ("eval_loss", "eval_continuation_accuracy", "eval_generation_samples")
        sys.stdout.write("METRICS " + json.dumps({k: metrics[k] for k in keep} | {
            "logged_accuracy": logged["eval_continuation_accuracy"],
            "world_size": trainer.args.world_size,
        }) + "\n")
    sys.stdout.flush()
    # A gloo worker thread that frees a finished collective after interpreter shutdown began
    # aborts the process ("terminate called without an active exception"). So the group must be
    # freed before exit: drop the DDP wrapper (it holds the group), then barrier + destroy.
    del trainer
    destroy_process_group()


if __name__ == "__main__":
    main()
