"""Print this rank's resolved topology as one JSON line (run under torchrun by the tests).

Usage: report_topology.py [group|accelerator|count_gathers]; ``count_gathers`` also reports how
many ``all_gather_object`` calls finding the node identity took.
"""

import json
import sys

import torch.distributed as dist

from accel_utils.topology import resolve

mode = sys.argv[1] if len(sys.argv) > 1 else "group"
gathers = []
if mode == "accelerator":
    from accelerate import Accelerator

    handle = Accelerator(cpu=True)
else:
    dist.init_process_group("gloo")
    handle = None
if mode == "count_gathers":
    real = dist.all_gather_object

    def counting(*args, **kwargs):  # counts calls; the real collective runs
        gathers.append(1)
        return real(*args, **kwargs)

    dist.all_gather_object = counting
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
            "gathers": len(gathers),
        }
    )
    + "\n"
)
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
