"""The topology resolver on real gloo process groups."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from accel_utils.topology import NodeLayout, Topology, resolve
from accel_utils.topology.nodes import HOST_KEYS, NodeFacts, decide
from tests.harness import launch_env, run_distributed, run_torchrun
from tests.stacks import needs_parallelism_config


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


@contextlib.contextmanager
def _gathers_counted() -> Iterator[list[int]]:
    """Counts side-channel gathers (``Lane.gather``) inside the block; the real one runs."""
    from accel_utils._side.lane import Lane

    calls: list[int] = []
    real = Lane.gather

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    Lane.gather = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Lane.gather = real  # type: ignore[method-assign]


def _bare_launcher() -> dict:
    with _gathers_counted() as calls:
        first = _summary(resolve())
        again = resolve().nodes
    return {"summary": first, "again": again, "gathers": len(calls)}


def test_node_identity_gathered_once_without_launcher_variables() -> None:
    bare = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_RANK": None,
            "GROUP_WORLD_SIZE": None}
    out = run_distributed(_bare_launcher, 2, env=bare)
    # one host: both ranks on node 0, told apart by their position
    assert [o["summary"]["node"] for o in out] == [(0, 1, 0, 2), (0, 1, 1, 2)]
    assert all(o["gathers"] == 1 for o in out)



def _bare_launcher_from_threads() -> dict:
    """Four threads ask for the node identity at once (a guard in each data-loading thread)."""
    start, nodes, errors = threading.Barrier(4), [], []

    def ask() -> None:
        start.wait()
        try:
            nodes.append(resolve().nodes)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(repr(exc))

    with _gathers_counted() as calls:
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    return {"nodes": len(set(nodes)), "errors": errors, "gathers": len(calls)}


def test_node_identity_asked_from_threads_at_once_is_gathered_once() -> None:
    # concurrent gathers on one group from several threads could pair crosswise between ranks
    bare = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_RANK": None,
            "GROUP_WORLD_SIZE": None}
    out = run_distributed(_bare_launcher_from_threads, 4, env=bare, timeout=60)
    assert out == [{"nodes": 1, "errors": [], "gathers": 1}] * 4, out

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


@pytest.mark.stack
@needs_parallelism_config
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


@pytest.mark.stack
def test_accelerator_and_partial_state() -> None:
    out = run_distributed(_accelerate_handles, 2, True)
    for rank, o in enumerate(out):
        assert o["state"]["rank"] == rank and o["state"]["world_size"] == 2
        assert o["accelerator"]["rank"] == rank and o["accelerator"]["dp"] == (rank, 2)
        assert o["warnings"] == []


@pytest.mark.stack
def test_partial_state_without_cpu_trusts_torch_distributed_and_warns_if_they_disagree() -> None:
    # What PartialState() without cpu=True makes of two CPU processes depends on the release:
    # Accelerate 1.1 still counts 2 (MULTI_CPU), 1.15 counts 1 (it looked for GPUs). The
    # library's view is torch.distributed's either way, with a warning exactly when they differ.
    if torch.cuda.is_available():
        pytest.skip("the cpu=True mistake only shows on a machine without a GPU")
    out = run_distributed(_accelerate_handles, 2, False)
    for rank, o in enumerate(out):
        assert o["state"]["rank"] == rank and o["state"]["world_size"] == 2
        warned = any("cpu=True" in w for w in o["warnings"])
        assert warned == (o["claimed"] != 2), o


def _disagreeing_state_with_mesh() -> dict:
    # Accelerate's state built without cpu=True on a CPU launch claims 1 process of 4; its mesh
    # (dp_shard x tp, set as Accelerator.__init__ sets it from a ParallelismConfig; Accelerate
    # builds it only on GPUs) is made of real torch groups. The fallback to the whole world
    # dropped it: reduce_loss summed over the tp ranks too, twice the tokens, no error.
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig

    from accel_utils import reduce_loss

    acc = Accelerator()
    acc.state.device_mesh = ParallelismConfig(dp_shard_size=2, tp_size=2).build_device_mesh("cpu")
    dp_rank = dist.get_rank() // 2  # tp is the inner dimension: ranks 0, 1 hold dp shard 0
    loss, tokens = reduce_loss([torch.tensor(1.0 + dp_rank)], 10 ** dp_rank, dp_group=acc)
    topo = resolve(acc)
    return {"claimed": acc.num_processes, "loss": (float(loss), int(tokens)),
            "dp": (topo.dp_rank, topo.dp_size), "tp": topo.tp_size,
            "loss_size": topo.loss_size, "same_mesh": topo.mesh is acc.state.device_mesh}


def test_a_state_that_disagrees_with_torch_keeps_its_mesh() -> None:
    if torch.cuda.is_available():
        pytest.skip("the cpu=True mistake only shows on a machine without a GPU")
    out = run_distributed(_disagreeing_state_with_mesh, 4)
    for rank, o in enumerate(out):
        assert o["claimed"] == 1  # Accelerate's own count is wrong ...
        assert o["same_mesh"] and o["tp"] == 2  # ... its mesh is not: kept
        assert o["dp"] == (rank // 2, 2) and o["loss_size"] == 2
        assert o["loss"] == (3.0, 11)  # over the 2 dp ranks, not (6.0, 22) over dp x tp


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


@pytest.mark.stack
def test_accelerator_under_torchrun() -> None:
    script = ["tests/scripts/report_topology.py", "accelerator"]
    rows = _rows(run_torchrun(script, nproc_per_node=2))
    assert [(r["rank"], r["world_size"], r["local_rank"], r["device"]) for r in rows] == [
        (0, 2, 0, "cpu"), (1, 2, 1, "cpu")
    ]


def test_import_is_light() -> None:
    code = (
        "import sys, accel_utils\n"
        # the modules that recognise DeepSpeed engines and runs, too: by name, never by import
        "from accel_utils import dp_eval_sample_shard, get_sync_ctx\n"
        "heavy = [m for m in ('transformers', 'datasets', 'accelerate', 'torch.distributed.fsdp',"
        " 'deepspeed') if m in sys.modules]\n"
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
    for package in (accel_utils._side, accel_utils.topology):
        assert sorted(package.__all__) == sorted(package._EXPORTS)
        assert all(getattr(package, name) is not None for name in package.__all__)


# ----------------------------------------------------------------------------- launches without
# torchrun: the launcher's variables are read at import; Accelerate's writes do not count


def _partial_state_then_nodes() -> dict:
    import os

    from accelerate import PartialState

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Keep(logging.DEBUG)
    topo_logger = logging.getLogger("accel_utils.topology")
    topo_logger.addHandler(handler)
    topo_logger.setLevel(logging.DEBUG)
    try:
        state = PartialState(cpu=True)  # writes LOCAL_RANK=0 / LOCAL_WORLD_SIZE=1 (no torchrun)
        nodes = resolve(state).nodes
    finally:
        topo_logger.removeHandler(handler)
        topo_logger.setLevel(logging.NOTSET)
    return {"node": (nodes.node_rank, nodes.num_nodes, nodes.local_rank, nodes.local_world_size),
            "environ": (os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")),
            "log": records}


@pytest.mark.stack
def test_partial_state_writing_local_rank_does_not_split_nodes() -> None:
    # 2 simulated nodes x 2 on one host; the launcher set RANK / WORLD_SIZE and the node index
    # (GROUP_RANK, as NODE_RANK would be) only. On main this resolved 4 nodes of 1 rank.
    env = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_WORLD_SIZE": None}
    out = run_distributed(_partial_state_then_nodes, 4, nodes=2, env=env)
    assert [o["environ"] for o in out] == [("0", "1")] * 4  # what Accelerate wrote
    assert [o["node"] for o in out] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]
    for o in out:
        assert any("changed after accel_utils was imported" in m and "LOCAL_RANK: unset -> 0" in m
                   for m in o["log"]), o["log"]
        assert any("from launcher variables (GROUP_RANK)" in m for m in o["log"]), o["log"]


def _count_gathers_for_nodes() -> dict:
    with _gathers_counted() as calls:
        nodes = resolve().nodes
        resolve().nodes  # noqa: B018 - cached: no second gather
    return {"node": (nodes.node_rank, nodes.num_nodes, nodes.local_rank, nodes.local_world_size),
            "gathers": len(calls)}


def test_complete_launcher_variables_need_no_gather() -> None:
    # LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK and GROUP_WORLD_SIZE describe the whole layout
    out = run_distributed(_count_gathers_for_nodes, 4, nodes=2)
    assert [o["node"] for o in out] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]
    assert [o["gathers"] for o in out] == [0] * 4


def test_partial_launcher_variables_are_checked_in_one_gather() -> None:
    # an srun-style recipe: node index and local ranks but no node count. Checked against the
    # group, and the check is the one gather of node keys (no second collective), per group
    out = run_distributed(_count_gathers_for_nodes, 4, nodes=2, env={"GROUP_WORLD_SIZE": None})
    assert [o["node"] for o in out] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]
    assert [o["gathers"] for o in out] == [1] * 4


def test_inconsistent_launcher_variables_are_not_used() -> None:
    # LOCAL_WORLD_SIZE=3 exported for 2 processes per node: rejected, positions decide
    env = {"LOCAL_WORLD_SIZE": "3", "GROUP_WORLD_SIZE": None}
    out = run_distributed(_count_gathers_for_nodes, 4, nodes=2, env=env)
    assert [o["node"] for o in out] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]
    assert [o["gathers"] for o in out] == [1] * 4


def test_torchrun_variables_need_no_gather() -> None:
    runs = run_torchrun(["tests/scripts/report_topology.py", "count_gathers"], nnodes=2,
                        nproc_per_node=2)
    rows = _rows(runs)
    assert [(r["node_rank"], r["num_nodes"], r["local_rank"], r["local_world_size"])
            for r in rows] == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]
    assert [r["gathers"] for r in rows] == [0] * 4


def _facts(host: str, address: str | None = "10.0.0.1", **claims) -> NodeFacts:
    return NodeFacts(host=host, address=address, **claims)


def test_decide_polluted_local_claims_fall_back_to_positions() -> None:
    # NODE_RANK per node, but LOCAL_RANK=0 / LOCAL_WORLD_SIZE=1 everywhere (as Accelerate
    # writes them, had accel_utils been imported after the Accelerator)
    facts = [_facts(f"h{n}", f"10.0.0.{n}", rank=r, world=4, node=n, node_var="NODE_RANK",
                    local_rank=0, local_size=1) for r, n in enumerate([0, 0, 1, 1])]
    verdict = decide(facts, whole_world=True)
    assert verdict.node_of == (0, 0, 1, 1) and verdict.local_of == (0, 1, 0, 1)
    assert verdict.source == "launcher variables (NODE_RANK)"
    assert "LOCAL_RANK [0, 0], not 0..1" in verdict.rejected[0]
    assert "LOCAL_WORLD_SIZE says 1" in verdict.rejected[0]


def test_decide_node_claims_spanning_hosts_are_rejected() -> None:
    # NODE_RANK=0 exported on every host by mistake: the addresses tell the hosts apart
    facts = [_facts("h", f"10.0.0.{n}", rank=r, world=4, node=0, node_var="NODE_RANK")
             for r, n in enumerate([0, 1, 0, 1])]
    verdict = decide(facts, whole_world=True)
    assert verdict.node_of == (0, 1, 0, 1) and verdict.local_of == (0, 0, 1, 1)
    assert verdict.source == HOST_KEYS and verdict.by_keys
    assert "NODE_RANK=0 is claimed from 2 hosts" in verdict.rejected[0]
    assert verdict.collisions == ("host name 'h' is used by 2 hosts (10.0.0.0, 10.0.0.1)",)


def test_decide_claims_may_split_one_host() -> None:
    # torchrun --nnodes 2 twice on one host (the tests' simulated nodes): claims win
    facts = [_facts("vm", "127.0.0.1", rank=r, world=4, node=r // 2, node_var="GROUP_RANK",
                    num_nodes=2, local_rank=r % 2, local_size=2) for r in range(4)]
    verdict = decide(facts, whole_world=True)
    assert verdict.node_of == (0, 0, 1, 1) and verdict.local_of == (0, 1, 0, 1)
    assert verdict.source == "launcher variables (GROUP_RANK, LOCAL_RANK)"
    assert verdict.rejected == () and verdict.collisions == () and not verdict.by_keys


def test_decide_uneven_and_round_robin_without_claims() -> None:
    uneven = decide([_facts(f"h{n}", f"10.0.0.{n}") for n in (0, 0, 0, 1)], whole_world=True)
    assert (uneven.node_of, uneven.local_of, uneven.num_nodes) == ((0, 0, 0, 1), (0, 1, 2, 0), 2)
    robin = decide([_facts(f"h{n}", f"10.0.0.{n}") for n in (0, 1, 0, 1)], whole_world=True)
    assert (robin.node_of, robin.local_of, robin.num_nodes) == ((0, 1, 0, 1), (0, 0, 1, 1), 2)
    assert robin.source == HOST_KEYS and robin.rejected == ()
    # LOCAL_RANK from an MPI recipe, ranks round robin: nodes from the keys, local ranks claimed
    facts = [_facts(f"h{n}", f"10.0.0.{n}", rank=r, world=4, local_rank=r // 2, local_size=2)
             for r, n in enumerate((0, 1, 0, 1))]
    claimed = decide(facts, whole_world=True)
    assert (claimed.node_of, claimed.local_of) == ((0, 1, 0, 1), (0, 0, 1, 1))
    assert claimed.by_keys and claimed.source == HOST_KEYS + ", local ranks from LOCAL_RANK"


def test_decide_rejects_claims_of_another_launch_and_partial_claims() -> None:
    # RANK / WORLD_SIZE at import are not this group's: none of the claims describe it
    other = [_facts("h", rank=r + 4, world=8, node=0, node_var="NODE_RANK") for r in range(2)]
    verdict = decide(other, whole_world=True)
    assert verdict.source == HOST_KEYS and "describe another launch" in verdict.rejected[0]
    partial = [_facts("h", rank=0, world=2, node=0, node_var="NODE_RANK"),
               _facts("h", rank=1, world=2)]
    verdict = decide(partial, whole_world=True)
    assert verdict.source == HOST_KEYS and "NODE_RANK is unset on rank(s) 1" in verdict.rejected
    # non-dense node indices
    sparse = [_facts(f"h{n}", f"10.0.0.{n}", node=n, node_var="NODE_RANK") for n in (0, 2)]
    verdict = decide(sparse, whole_world=True)
    assert verdict.node_of == (0, 1) and "values [0, 2] are not 0..1" in verdict.rejected[0]


def test_decide_subgroup_renumbers_claimed_nodes() -> None:
    # ranks 1 and 3 of a 2 x 2 launch: each its node's only member of the subgroup
    facts = [_facts("vm", node=n, node_var="GROUP_RANK", local_rank=1, local_size=2)
             for n in (0, 1)]
    verdict = decide(facts, whole_world=False)
    assert verdict.node_of == (0, 1) and verdict.local_of == (0, 0)
    assert verdict.source == "launcher variables (GROUP_RANK)"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.booleans(), st.booleans(),
       st.booleans())
def test_decide_gives_each_node_exactly_one_local_rank_0(placement, node_rank, polluted,
                                                           twins) -> None:
    # any placement of ranks on hosts; NODE_RANK true or unset; LOCAL_RANK=0 /
    # LOCAL_WORLD_SIZE=1 everywhere (Accelerate's writes) or unset; all hosts named alike or not
    order = list(dict.fromkeys(placement))  # the true nodes, numbered by their lowest rank
    facts = [_facts("twin" if twins else f"h{n}", f"10.0.0.{n}", rank=r, world=len(placement),
                    node=order.index(n) if node_rank else None,
                    node_var="NODE_RANK" if node_rank else None,
                    local_rank=0 if polluted else None, local_size=1 if polluted else None)
             for r, n in enumerate(placement)]
    verdict = decide(facts, whole_world=True)
    assert verdict.node_of == tuple(order.index(n) for n in placement)
    assert verdict.num_nodes == len(order)
    for node in range(len(order)):
        members = [r for r, n in enumerate(verdict.node_of) if n == node]
        assert [verdict.local_of[r] for r in members] == list(range(len(members)))
    assert bool(verdict.collisions) == (twins and len(order) > 1)
