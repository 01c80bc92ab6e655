"""Print this rank's resolved topology as one JSON line (run under torchrun by the tests)."""

import json
import sys

import torch.distributed as dist

from accel_utils.topology import resolve

mode = sys.argv[1] if len(sys.argv) > 1 else "group"
if mode == "accelerator":
    from accelerate import Accelerator

    handle = Accelerator(cpu=True)
else:
    dist.init_process_group("gloo")
    handle = None
topo = resolve(handle)
nodes = topo.nodes
# one write per line: ranks share the launcher's stdout pipe
sys.stdout.write(
    "TOPOLOGY "
    + json.dumps(
        {
            "rank": topo.rank,
            "world_size": topo.world_size,
            "node_rank": nodes.node_rank,
            "num_nodes": nodes.num_nodes,
            "local_rank": nodes.local_rank,
            "local_world_size": nodes.local_world_size,
            "device": str(topo.device),
            "dp_size": topo.dp_size,
            "backend": topo.backend,
        }
    )
    + "\n"
)
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
