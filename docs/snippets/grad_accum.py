"""Gradient accumulation with one gradient sync and one loss all-reduce per step.

    torchrun --nproc_per_node 2 docs/snippets/grad_accum.py
"""

import torch
from accelerate import Accelerator

from accel_utils import destroy_process_group, get_sync_ctx, reduce_loss


def main() -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = accelerator.prepare(torch.nn.Linear(8, 1))  # DDP on 2 processes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    K = 4
    gen = torch.Generator().manual_seed(accelerator.process_index)
    micro_batches = [(torch.randn(3, 8, generator=gen), torch.randn(3, 1, generator=gen))
                     for _ in range(K)]
    # --8<-- [start:loop]
    store, count = [], 0
    for k, (x, y) in enumerate(micro_batches):  # K micro-batches per optimizer step
        with get_sync_ctx(model, is_optim_step=k == K - 1):  # forward AND backward inside
            loss = ((model(x) - y) ** 2).sum()  # a sum over this micro-batch's elements
            loss.backward()
        store.append(loss.detach())
        count += y.numel()
    loss_sum, denominator = reduce_loss(store, count, group=accelerator)  # one all-reduce
    for p in model.parameters():  # DDP averaged over ranks: make it the global mean's gradient
        p.grad.mul_(accelerator.num_processes / denominator.item())
    optimizer.step()
    optimizer.zero_grad()
    print(f"mean loss {(loss_sum / denominator).item():.4f} over {denominator.item()} elements")
    # --8<-- [end:loop]
    assert denominator.item() == K * 3 * accelerator.num_processes
    destroy_process_group()


if __name__ == "__main__":
    main()
