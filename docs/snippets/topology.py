"""What resolve() sees on every rank: ``torchrun --nproc_per_node 2 docs/snippets/topology.py``."""

from accelerate import Accelerator

from accel_utils import destroy_process_group, resolve


def main() -> None:
    accelerator = Accelerator(cpu=True)  # cpu=True on machines without a GPU per process
    # --8<-- [start:resolve]
    topo = resolve(accelerator)  # or a PartialState, TrainingArguments, ProcessGroup, DeviceMesh
    print(topo.rank, topo.world_size, topo.nodes.node_rank, topo.nodes.local_rank)
    print(topo.loss_size, topo.dp_rank, topo.dp_size, topo.replicate_size, topo.cp_size)
    # --8<-- [end:resolve]
    assert (topo.rank, topo.world_size) == (accelerator.process_index, accelerator.num_processes)
    assert resolve(None).world_size == topo.world_size  # None: the default group
    destroy_process_group()  # barrier, then teardown (see "Launching")


if __name__ == "__main__":
    main()
