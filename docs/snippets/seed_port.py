"""Code written for NeMo Automodel's distributed utils, on accel-utils.

    torchrun --nproc_per_node 2 docs/snippets/seed_port.py
"""

from datetime import timedelta

import torch
import torch.distributed as dist

# --8<-- [start:imports]
# from nemo_automodel.components.distributed.utils import (
from accel_utils import (
    FirstRankPerNode,
    barrier_and_log,
    destroy_process_group,
    get_sync_ctx,
    logger,
    reduce_loss,
)

# private, as in the seed
from accel_utils.barriers import _barrier_with_timeout, _create_gloo_group

# --8<-- [end:imports]


def main() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the launcher's variables (torchrun)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    num_tokens = torch.tensor([2])
    # --8<-- [start:seed-calls]
    with FirstRankPerNode() as first:  # unchanged seed call: now each node's local rank 0 first
        pass
    with get_sync_ctx(model, True, True):  # the seed's three positional arguments
        loss_store = [model(torch.ones(2, 4)).sum()]
        loss_store[0].backward()
    loss, denominator = reduce_loss(loss_store, num_tokens)  # None: the default group now
    barrier_and_log(f"step done, loss {(loss / denominator).item():.3f}")
    if not _barrier_with_timeout(timedelta(minutes=5)):  # False (and a warning) on a timeout
        logger.warning("a rank is late")
    side = _create_gloo_group()  # the default group's cached gloo side group, made once
    # --8<-- [end:seed-calls]
    # --8<-- [start:seed-behaviour]
    with FirstRankPerNode(local=False, timeout=timedelta(hours=2)) as first:  # rank 0 alone first
        pass
    solo = dist.new_group([dist.get_rank()], use_local_synchronization=True)  # made once
    loss, denominator = reduce_loss(loss_store, num_tokens, dp_group=solo)  # per-rank values
    denominator = denominator.reshape(num_tokens.shape).int()  # the seed's shape and dtype
    # --8<-- [end:seed-behaviour]
    assert first == (dist.get_rank() == 0) and denominator.dtype == torch.int32
    assert denominator.tolist() == [2] and loss.shape == (1,) and side is _create_gloo_group()
    del model  # DDP holds the group
    destroy_process_group()


if __name__ == "__main__":
    main()
