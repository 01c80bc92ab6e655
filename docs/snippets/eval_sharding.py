"""Score eval samples on disjoint shards and gather them back.

    torchrun --nproc_per_node 2 docs/snippets/eval_sharding.py
"""

from accelerate import Accelerator

from accel_utils import (
    destroy_process_group,
    dp_eval_sample_shard,
    gather_sharded_results,
    shard_samples,
)


def score(sample: int) -> float:
    """Stands in for ``model.generate`` and a metric."""
    return float(sample % 3 == 0)


def main() -> None:
    accelerator = Accelerator(cpu=True)
    eval_samples = list(range(10))
    # --8<-- [start:shard]
    shard = dp_eval_sample_shard(accelerator)  # (dp_rank, dp_size) under DDP; None under FSDP/TP
    mine = shard_samples(eval_samples, shard)  # a list, tuple or datasets.Dataset; None: all
    # with a model: model.generate(..., synced_gpus=shard is None and world_size > 1)
    scores = [score(sample) for sample in mine]
    all_scores = gather_sharded_results(scores, shard, group=accelerator)  # every sample, in order
    # --8<-- [end:shard]
    assert all_scores == [score(sample) for sample in eval_samples]
    assert len(mine) == (5 if accelerator.num_processes == 2 else 10)
    destroy_process_group()


if __name__ == "__main__":
    main()
