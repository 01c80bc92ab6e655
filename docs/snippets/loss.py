"""What reduce_loss returns: ``torchrun --nproc_per_node 2 docs/snippets/loss.py``."""

import torch
from accelerate import Accelerator

from accel_utils import destroy_process_group, reduce_loss


def main() -> None:
    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    # --8<-- [start:shapes]
    loss_store = [torch.tensor(2.0), torch.tensor(4.0)]  # this rank's loss sums, per micro-batch
    loss_sum, denominator = reduce_loss(loss_store, torch.tensor([10]), group=accelerator)
    assert loss_sum.shape == denominator.shape == (1,)
    assert loss_sum.dtype == torch.float32 and denominator.dtype == torch.int64  # exact counts
    per_token = (loss_sum / denominator).item()  # 6.0 * world / (10 * world)
    # per_token_loss=False: the denominator counts micro-batches instead of tokens
    loss_sum, batches = reduce_loss(loss_store, 0, per_token_loss=False, group=accelerator)
    # --8<-- [end:shapes]
    assert per_token == 0.6000000238418579 or abs(per_token - 0.6) < 1e-6
    assert batches.item() == 2 * world and loss_sum.item() == 6.0 * world
    destroy_process_group()


if __name__ == "__main__":
    main()
