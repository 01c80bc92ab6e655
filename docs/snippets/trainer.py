"""A Trainer subclass with a sharded generation eval, and TrainingArguments as the group.

    torchrun --nproc_per_node 2 docs/snippets/trainer.py
"""

import os
import tempfile

import torch
from datasets import Dataset, disable_progress_bars
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from accel_utils import FirstRankPerNode, destroy_process_group
from accel_utils.integrations.trainer import ShardedGenerationEvalMixin


def sequences(n: int, step: int) -> Dataset:
    ids = [[(start + step * i) % 16 for i in range(6)] for start in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 6] * n})


# --8<-- [start:subclass]
class MyTrainer(ShardedGenerationEvalMixin, Trainer):
    def generation_step(self, model, samples, **generate_kwargs):  # one result per sample
        prompts = torch.tensor([s["input_ids"][:4] for s in samples])
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2,
                             min_new_tokens=2, do_sample=False, pad_token_id=0, **generate_kwargs)
        targets = torch.tensor([s["input_ids"][4:] for s in samples])
        return (out[:, 4:] == targets).float().mean(dim=1).tolist()
# --8<-- [end:subclass]


def main() -> None:
    disable_progress_bars()
    output_dir = os.path.join(tempfile.gettempdir(), "accel_utils_docs_trainer")
    # --8<-- [start:evaluate]
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, ddp_backend="gloo",
                             report_to=[], per_device_eval_batch_size=4)
    with FirstRankPerNode(args):  # TrainingArguments work wherever a group does
        easy, hard = sequences(12, 1), sequences(10, 3)  # build or load, once per node first
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
    ))
    trainer = MyTrainer(model=model, args=args, eval_dataset={"easy": easy, "hard": hard},
                        data_collator=default_data_collator)
    trainer.generation_samples = {"easy": easy, "hard": hard}  # or one list for all datasets
    metrics = trainer.evaluate()  # eval_easy_loss, eval_easy_generation_score, eval_hard_...
    # --8<-- [end:evaluate]
    assert {"eval_easy_generation_score", "eval_hard_generation_score"} <= set(metrics)
    assert "eval_generation_score" not in metrics
    del trainer  # its DDP wrapper holds the process group
    destroy_process_group()


if __name__ == "__main__":
    main()
