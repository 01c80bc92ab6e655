"""A training loop under a HangWatch: a healthy loop reports nothing.

    torchrun --nproc_per_node 2 docs/snippets/hang_watch.py
"""

import logging

import torch
from accelerate import Accelerator

from accel_utils import HangWatch, destroy_process_group


def main() -> None:
    logging.basicConfig()  # the table is a log record (logger "accel_utils.hang_watch")
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.randn(32, 9, generator=torch.Generator().manual_seed(0))
    batches = iter(data.chunk(8))
    # --8<-- [start:watch]
    with HangWatch(accelerator, stall=60) as watch:  # 60 s without progress: a stall
        for _ in range(8):
            watch.step()                         # a step begins: a few attribute writes
            watch.phase("data")                  # optional: where in the step it is
            batch = next(batches)
            watch.phase("forward-backward")
            loss = ((model(batch[:, :8]) - batch[:, 8:]) ** 2).mean()
            accelerator.backward(loss)           # DDP all-reduces the gradients in here
            watch.phase("optimizer")
            optimizer.step()
            optimizer.zero_grad()
    # --8<-- [end:watch]
    assert watch.reports == 0, watch.last_report  # a healthy loop reports nothing

    del model, optimizer  # the DDP wrapper holds the process group
    destroy_process_group()


if __name__ == "__main__":
    main()
