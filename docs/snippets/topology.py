"""What resolve() sees on every rank: ``torchrun --nproc_per_node 2 docs/snippets/topology.py``."""

import torch
from accelerate import Accelerator

from accel_utils import barrier_and_log, destroy_process_group, get_sync_ctx, reduce_loss, resolve


def main() -> None:
    accelerator = Accelerator(cpu=True)  # cpu=True on machines without a GPU per process
    # --8<-- [start:resolve]
    topo = resolve(accelerator)  # or a PartialState, TrainingArguments, ProcessGroup, DeviceMesh
    print(topo.rank, topo.world_size, topo.nodes.node_rank, topo.nodes.local_rank)
    print(topo.loss_size, topo.dp_rank, topo.dp_size, topo.replicate_size, topo.cp_size)
    # --8<-- [end:resolve]
    assert (topo.rank, topo.world_size) == (accelerator.process_index, accelerator.num_processes)
    assert resolve(None).world_size == topo.world_size  # None: the default group
    model = accelerator.prepare(torch.nn.Linear(4, 1))
    # --8<-- [start:convention]
    loss_sum, tokens = reduce_loss([torch.tensor(2.0)], 10, group=accelerator)  # or dp_group=
    with get_sync_ctx(model, None, group=accelerator):  # or accelerator=; None: sync_gradients
        model(torch.ones(1, 4)).sum().backward()
    barrier_and_log("step done", accelerator)  # by position, after the function's own inputs
    try:
        reduce_loss([torch.tensor(2.0)], 10, group=accelerator, dp_group=accelerator)
    except TypeError as exc:  # two names for one parameter: pass one
        print(exc)
    # --8<-- [end:convention]
    assert (loss_sum.item(), tokens.item()) == (2.0 * topo.world_size, 10 * topo.world_size)
    destroy_process_group()  # barrier, then teardown (see "Launching")


if __name__ == "__main__":
    main()
