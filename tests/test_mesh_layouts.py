"""Every mesh layout on real 4- and 8-process gloo groups: reduce_loss sums over data x cp ranks
(never tp), dp_eval_sample_shard shards over data ranks only (never across cp), and accel-utils
raises no warning of its own (UserWarnings are errors around its calls)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from accel_utils import dp_eval_sample_shard, reduce_loss, resolve
from tests.harness import run_distributed
from tests.stacks import needs_parallelism_config


def _mesh(layout: str) -> Any:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if layout == "accelerate_dp_shard_cp":  # Accelerate's own mesh, with its flattened dims
        from accelerate.parallelism_config import ParallelismConfig

        return ParallelismConfig(dp_shard_size=2, cp_size=2).build_device_mesh("cpu")
    if layout == "accelerate_flat_dp_cp":  # Accelerate's flattened loss mesh, handed out alone
        from accelerate.parallelism_config import ParallelismConfig

        root = ParallelismConfig(dp_shard_size=2, cp_size=2).build_device_mesh("cpu")
        # torch 2.13's way to reach a flattened mesh without slicing it from the root: flatten
        # the same dims under the same name again (returns the one Accelerate made)
        return root["dp_shard", "cp"]._flatten("dp_cp")
    if layout == "dp_cp_on_4_of_8":  # every rank builds it; ranks 4..7 are not in it
        return DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("dp", "cp"))
    shapes = {
        "dp_cp": ((2, 2), ("dp", "cp")),
        "dp_tp": ((2, 2), ("dp", "tp")),
        "cp": ((4,), ("cp",)),
        "dp_replicate_dp_shard_cp": ((2, 2, 2), ("dp_replicate", "dp_shard", "cp")),
        "dp_cp_tp": ((2, 2, 2), ("dp", "cp", "tp")),
    }
    shape, names = shapes[layout]
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _probe(layout: str) -> dict | None:
    mesh = _mesh(layout)
    if mesh.get_coordinate() is None:  # not a member: accel-utils says so
        try:
            resolve(mesh)
        except ValueError as exc:
            return {"error": str(exc)}
        return {"error": ""}
    rank = dist.get_rank()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        topo = resolve(mesh)
        loss, tokens = reduce_loss([torch.tensor(float(rank + 1))], 10 ** rank, dp_group=mesh)
        shard = dp_eval_sample_shard(mesh)
    return {
        "loss": float(loss), "tokens": int(tokens), "shard": shard,
        "dp": (topo.dp_rank, topo.dp_size), "loss_group": (topo.loss_rank, topo.loss_size),
        "cp": topo.cp_size, "tp": topo.tp_size,
    }


def _probe_all(layouts: list[str]) -> dict:
    return {layout: _probe(layout) for layout in layouts}


# layout -> (world size, the global ranks rank r sums its loss with, r's eval shard, cp, tp)
Case = tuple[int, Callable[[int], list[int]], Callable[[int], Any], int, int]
CASES: dict[str, Case] = {
    "dp_cp": (4, lambda r: [0, 1, 2, 3], lambda r: (r // 2, 2), 2, 1),
    "dp_tp": (4, lambda r: [r % 2, r % 2 + 2], lambda r: (r // 2, 2), 1, 2),
    "cp": (4, lambda r: [0, 1, 2, 3], lambda r: None, 4, 1),
    # FSDP shards over dp_shard: every rank of a replica scores the same samples
    "accelerate_dp_shard_cp": (4, lambda r: [0, 1, 2, 3], lambda r: None, 2, 1),
    # data and cp ranks mixed in one dim: a loss group, but no eval shard (cp_size unknown: 1)
    "accelerate_flat_dp_cp": (4, lambda r: [0, 1, 2, 3], lambda r: None, 1, 1),
    "dp_replicate_dp_shard_cp": (8, lambda r: list(range(8)), lambda r: (r // 4, 2), 2, 1),
    "dp_cp_tp": (8, lambda r: [r % 2 + 2 * i for i in range(4)], lambda r: (r // 4, 2), 2, 2),
    "dp_cp_on_4_of_8": (8, lambda r: [0, 1, 2, 3], lambda r: (r // 2, 2), 2, 1),
}


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    "world_size, meshes",
    [(4, "torch"), pytest.param(4, "accelerate", marks=needs_parallelism_config), (8, "torch")],
)
def test_loss_group_and_eval_shard_per_layout(world_size: int, meshes: str) -> None:
    accelerate = meshes == "accelerate"  # Accelerate-built meshes (1.10+) apart
    layouts = [name for name, (size, *_) in CASES.items()
               if size == world_size and name.startswith("accelerate_") == accelerate]
    out = run_distributed(_probe_all, world_size, layouts, timeout=180)
    for rank, seen in enumerate(out):
        for layout in layouts:
            _, loss_ranks, shard, cp, tp = CASES[layout]
            got = seen[layout]
            if layout == "dp_cp_on_4_of_8" and rank >= 4:
                assert "not one of the DeviceMesh's ranks" in got["error"]
                continue
            ranks = loss_ranks(rank)
            assert got["loss"] == sum(r + 1 for r in ranks), (layout, rank)
            assert got["tokens"] == sum(10 ** r for r in ranks), (layout, rank)
            assert got["loss_group"] == (ranks.index(rank), len(ranks)), (layout, rank)
            assert got["shard"] == shard(rank), (layout, rank, got)
            assert (got["cp"], got["tp"]) == (cp, tp), (layout, rank)
