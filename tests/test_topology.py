"""The topology resolver on real gloo process groups."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from accel_utils.topology import NodeLayout, Topology, resolve
from tests.harness import launch_env, run_distributed, run_torchrun


def _summary(topo: Topology) -> dict:
    nodes = topo.nodes
    return {
        "rank": topo.rank,
        "world_size": topo.world_size,
        "dp": (topo.dp_rank, topo.dp_size),
        "replicate": (topo.replicate_rank, topo.replicate_size),
        "shard": (topo.shard_rank, topo.shard_size),
        "node": (nodes.node_rank, nodes.num_nodes, nodes.local_rank, nodes.local_world_size),
        "backend": topo.backend,
        "device": str(topo.device),
    }


def test_no_process_group_is_one_process() -> None:
    assert not dist.is_initialized()
    topo = resolve()
    assert (topo.rank, topo.world_size, topo.group, topo.dp_size) == (0, 1, None, 1)
    assert topo.nodes == NodeLayout()
    assert not topo.distributed_enabled and topo.is_main


def test_rejects_unknown_handle_with_clear_error() -> None:
    # without a group resolve() never raises; with one it names what it accepts
    assert resolve("anything").world_size == 1
    out = run_distributed(_reject_handle, 2)
    assert all("ProcessGroup" in msg and "str" in msg for msg in out)


def _reject_handle() -> str:
    try:
        resolve("world")
    except TypeError as exc:
        return str(exc)
    return "no error"


def _world() -> dict:
    return _summary(resolve())


@pytest.mark.parametrize("world_size", [2, 4])
def test_world(world_size: int) -> None:
    out = run_distributed(_world, world_size)
    for rank, summary in enumerate(out):
        assert summary["rank"] == rank
        assert summary["world_size"] == world_size
        assert summary["dp"] == (rank, world_size)
        assert summary["node"] == (0, 1, rank, world_size)
        assert summary["backend"] == "gloo" and summary["device"] == "cpu"


def test_simulated_nodes_from_launcher_variables() -> None:
    out = run_distributed(_world, 4, nodes=2)
    assert [s["node"] for s in out] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]


def _subgroups() -> dict:
    odd = dist.new_group([1, 3])
    first_node = dist.new_group([0, 1])
    rank = dist.get_rank()
    result = {}
    if rank in (1, 3):
        result["odd"] = _summary(resolve(odd))
    else:
        try:
            resolve(odd)
        except ValueError as exc:
            result["odd_error"] = str(exc)
    if rank in (0, 1):
        result["first_node"] = _summary(resolve(first_node))
    return result


def test_subgroup_ranks_and_nodes() -> None:
    out = run_distributed(_subgroups, 4, nodes=2)
    # ranks 1 and 3 sit on different nodes: each is its node's only member of the subgroup
    assert out[1]["odd"]["rank"] == 0 and out[3]["odd"]["rank"] == 1
    assert out[1]["odd"]["node"] == (0, 2, 0, 1)
    assert out[3]["odd"]["node"] == (1, 2, 0, 1)
    assert "not a member" in out[0]["odd_error"] and "rank 0" in out[0]["odd_error"]
    assert out[0]["first_node"]["node"] == (0, 1, 0, 2)
    assert out[1]["first_node"]["node"] == (0, 1, 1, 2)


def _bare_launcher() -> dict:
    calls = []
    real = dist.all_gather_object

    def counting(*args, **kwargs):  # counts calls; the real collective runs
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_gather_object = counting
    try:
        first = _summary(resolve())
        again = resolve().nodes
    finally:
        dist.all_gather_object = real
    return {"summary": first, "again": again, "gathers": len(calls)}


def test_node_identity_gathered_once_without_launcher_variables() -> None:
    bare = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_RANK": None,
            "GROUP_WORLD_SIZE": None}
    out = run_distributed(_bare_launcher, 2, env=bare)
    # one host: both ranks on node 0, told apart by their position
    assert [o["summary"]["node"] for o in out] == [(0, 1, 0, 2), (0, 1, 1, 2)]
    assert all(o["gathers"] == 1 for o in out)


def _mesh_2x2() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    named = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    unnamed = init_device_mesh("cpu", (2, 2))
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    tp = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    return {"named": _summary(resolve(named)), "unnamed": _summary(resolve(unnamed)),
            "flat": _summary(resolve(flat)), "tp": _summary(resolve(tp)),
            "tp_size": resolve(tp).tp_size}


def test_device_mesh_views() -> None:
    out = run_distributed(_mesh_2x2, 4)
    for rank, views in enumerate(out):
        for key in ("named", "unnamed"):
            assert views[key]["replicate"] == (rank // 2, 2)
            assert views[key]["shard"] == (rank % 2, 2)
            assert views[key]["dp"] == (rank, 4)
        assert views["flat"]["dp"] == (rank, 4) and views["flat"]["replicate"] == (rank, 4)
        # a tensor-parallel mesh alone: no data parallelism, losses are not summed over it
        assert views["tp"]["dp"] == (0, 1) and views["tp"]["rank"] == rank
        assert views["tp_size"] == 4


def _accelerate_mesh() -> dict:
    # Accelerate builds its parallelism mesh only for GPU types; build the same mesh by hand
    # (dims in ParallelismConfig's order, the flattened "dp_cp" used for losses).
    from accelerate.parallelism_config import ParallelismConfig

    pc = ParallelismConfig(dp_replicate_size=1, dp_shard_size=2, tp_size=2)
    mesh = pc.build_device_mesh("cpu")
    return _summary(resolve(mesh)) | {"tp": resolve(mesh).tp_size}


def test_accelerate_parallelism_mesh_reduces_over_dp_not_tp() -> None:
    out = run_distributed(_accelerate_mesh, 4)
    for rank, summary in enumerate(out):
        assert summary["dp"] == (rank // 2, 2)  # dp_shard outer, tp inner
        assert summary["tp"] == 2
        assert summary["world_size"] == 4


def _accelerate_handles(use_cpu: bool) -> dict:
    from accelerate import Accelerator, PartialState

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Keep()
    logging.getLogger("accel_utils").addHandler(handler)
    try:
        state = PartialState(cpu=True) if use_cpu else PartialState()
        from_state = _summary(resolve(state))
        from_acc = _summary(resolve(Accelerator(cpu=True))) if use_cpu else None
    finally:
        logging.getLogger("accel_utils").removeHandler(handler)
    return {"state": from_state, "accelerator": from_acc, "claimed": state.num_processes,
            "warnings": records}


def test_accelerator_and_partial_state() -> None:
    out = run_distributed(_accelerate_handles, 2, True)
    for rank, o in enumerate(out):
        assert o["state"]["rank"] == rank and o["state"]["world_size"] == 2
        assert o["accelerator"]["rank"] == rank and o["accelerator"]["dp"] == (rank, 2)
        assert o["warnings"] == []


def test_partial_state_without_cpu_trusts_torch_distributed_and_warns() -> None:
    if torch.cuda.is_available():
        pytest.skip("the cpu=True mistake only shows on a machine without a GPU")
    out = run_distributed(_accelerate_handles, 2, False)
    for rank, o in enumerate(out):
        assert o["claimed"] == 1  # Accelerate's own view is wrong ...
        assert o["state"]["rank"] == rank and o["state"]["world_size"] == 2  # ... ours is not
        assert any("cpu=True" in w for w in o["warnings"])


def _rows(runs) -> list[dict]:
    rows = []
    for run in runs:
        assert run.returncode == 0, run.output[-4000:]
        rows += [json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines()
                 if line.startswith("TOPOLOGY ")]
    return sorted(rows, key=lambda r: r["rank"])


def test_two_simulated_nodes_under_torchrun() -> None:
    rows = _rows(run_torchrun(["tests/scripts/report_topology.py"], nnodes=2, nproc_per_node=2))
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in rows] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)
    ]
    assert all(r["num_nodes"] == 2 and r["local_world_size"] == 2 for r in rows)


def test_accelerator_under_torchrun() -> None:
    script = ["tests/scripts/report_topology.py", "accelerator"]
    rows = _rows(run_torchrun(script, nproc_per_node=2))
    assert [(r["rank"], r["world_size"], r["local_rank"], r["device"]) for r in rows] == [
        (0, 2, 0, "cpu"), (1, 2, 1, "cpu")
    ]


def test_import_is_light() -> None:
    code = (
        "import sys, accel_utils\n"
        "heavy = [m for m in ('transformers', 'datasets', 'accelerate', 'torch.distributed.fsdp')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=launch_env(), timeout=120, check=True)
    assert out.stdout.strip() == "", f"import accel_utils pulled in {out.stdout.strip()}"


def test_every_public_name_resolves() -> None:
    import accel_utils

    for name in accel_utils.__all__:
        assert getattr(accel_utils, name) is not None


def test_all_lists_every_export() -> None:
    import accel_utils

    # __all__ is a literal list for type checkers; it must stay in step with the lazy table
    assert sorted(accel_utils.__all__) == sorted([*accel_utils._EXPORTS, "logger", "__version__"])
