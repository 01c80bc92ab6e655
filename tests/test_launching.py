"""Launches without torchrun on the namespace bed (tests/cluster.py): who is on which node.

Two hosts (network namespaces with their own host names, addresses and node-local tmpfs). Each
launch starts 4 ranks as mpirun / srun recipes do: only RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, optionally NODE_RANK per node, optionally ``Accelerator(cpu=True)`` built before
accel-utils resolves anything (it writes LOCAL_RANK=0 / LOCAL_WORLD_SIZE=1 on every rank), with
ranks placed node by node, 3 + 1 or round robin, and two hosts that may share a host name.
Every rank must report its true node identity, and ``FirstRankPerNode(local=True)`` must let
exactly one rank per node go first. One bed serves the whole module; every launch has a hard
timeout. No wall times are asserted. Needs root; skipped otherwise unless
ACCEL_UTILS_REQUIRE_NETNS=1.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.cluster import Cluster, ProcResult, bed_for_tests

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "launch_worker.py")
TWO_BY_TWO = [0, 0, 1, 1]
UNEVEN = [0, 0, 0, 1]
ROUND_ROBIN = [0, 1, 0, 1]
HARD_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def cluster():
    with bed_for_tests() as bed:
        yield bed


def _truth(placement: list[int]) -> list[tuple[int, int, int, int]]:
    """(node_rank, num_nodes, local_rank, local_world_size) of each rank; nodes are numbered as
    the placement numbers them, local ranks in rank order (what torchrun would assign)."""
    num_nodes = len(set(placement))
    out = []
    for rank, node in enumerate(placement):
        members = [r for r, n in enumerate(placement) if n == node]
        out.append((node, num_nodes, members.index(rank), len(members)))
    return out


def _launch(cluster: Cluster, tag: str, placement: list[int], *, node_rank: bool,
            accelerator: bool, hostnames: list[str] | None = None,
            launcher_vars: bool = False) -> tuple[list[dict], str]:
    args = [tag, "--accelerator"] if accelerator else [tag]
    job = cluster.launch(WORKER, args, placement=placement, launcher_vars=launcher_vars,
                         node_rank=node_rank, hostnames=hostnames, timeout=HARD_TIMEOUT)
    results: list[ProcResult] = job.wait()
    report = job.describe()
    assert not job.timed_out, "hard timeout\n" + report
    assert [r.returncode for r in results] == [0] * len(placement), report
    outs = [r.results()[0] for r in results]
    return outs, report


def _assert_identity_and_one_first_per_node(outs: list[dict], placement: list[int],
                                            report: str) -> None:
    seen = [(o["node_rank"], o["num_nodes"], o["local_rank"], o["local_world_size"])
            for o in outs]
    assert seen == _truth(placement), report
    firsts: dict[int, list[int]] = {}
    for rank, node in enumerate(placement):
        if outs[rank]["first"]:
            firsts.setdefault(node, []).append(rank)
    # exactly one first rank per (true) node, and it is the node's lowest rank
    expected = {node: [placement.index(node)] for node in set(placement)}
    assert firsts == expected, f"first ranks per node {firsts}\n{report}"
    # the node-local disk holds that one marker, seen by every rank of the node after the guard
    for rank, node in enumerate(placement):
        if not outs[rank]["first"]:
            assert outs[rank]["markers"] == [f"rank{placement.index(node)}"], report


CASES = [
    # (id, placement, NODE_RANK exported, Accelerator(cpu=True) before resolve)
    ("2x2", TWO_BY_TWO, False, False),
    ("2x2-node_rank", TWO_BY_TWO, True, False),
    ("2x2-accelerator", TWO_BY_TWO, False, True),
    ("2x2-node_rank-accelerator", TWO_BY_TWO, True, True),
    ("3+1-node_rank-accelerator", UNEVEN, True, True),
    ("3+1-accelerator", UNEVEN, False, True),
    ("round_robin-node_rank-accelerator", ROUND_ROBIN, True, True),
    ("round_robin", ROUND_ROBIN, False, False),
]


@pytest.mark.timeout(HARD_TIMEOUT + 30)
@pytest.mark.parametrize(("placement", "node_rank", "accelerator"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_manual_launch(cluster, placement, node_rank, accelerator) -> None:
    tag = f"manual-{len(os.listdir(cluster.shared_dir))}"
    outs, report = _launch(cluster, tag, placement, node_rank=node_rank, accelerator=accelerator)
    _assert_identity_and_one_first_per_node(outs, placement, report)
    if accelerator:  # what made the resolver go wrong before: Accelerate wrote these
        assert {o["environ"]["LOCAL_WORLD_SIZE"] for o in outs} == {"1"}, report
    if node_rank:  # NODE_RANK describes the nodes truly: it is the source
        assert all(any("launcher variables" in m for m in o["log"]) for o in outs), report


@pytest.mark.stack
@pytest.mark.timeout(HARD_TIMEOUT + 30)
@pytest.mark.parametrize("node_rank", [False, True], ids=["bare", "node_rank"])
def test_accelerator_built_before_accel_utils_is_imported(cluster, node_rank) -> None:
    """The variables Accelerate wrote are all accel-utils ever saw: the consistency check (local
    ranks 0..n-1, LOCAL_WORLD_SIZE = n on each node) rejects them, and rank 0 says so."""
    job = cluster.launch(WORKER, ["late", "--accelerator", "--late-import"],
                         placement=UNEVEN, launcher_vars=False, node_rank=node_rank,
                         timeout=HARD_TIMEOUT)
    results = job.wait()
    report = job.describe()
    assert not job.timed_out, "hard timeout\n" + report
    assert [r.returncode for r in results] == [0] * 4, report
    outs = [r.results()[0] for r in results]
    _assert_identity_and_one_first_per_node(outs, UNEVEN, report)
    warning = [m for m in outs[0]["log"] if m.startswith("WARNING")]
    assert warning and "LOCAL_WORLD_SIZE says 1" in warning[0], report
    assert "import accel_utils first" in warning[0], report


@pytest.mark.timeout(HARD_TIMEOUT + 30)
@pytest.mark.parametrize("accelerator", [False, True], ids=["plain", "accelerator"])
def test_duplicate_host_names_are_two_nodes(cluster, accelerator) -> None:
    """Both hosts are called "twin" (cloned images, containers): addresses tell them apart."""
    tag = f"twins-{len(os.listdir(cluster.shared_dir))}"
    outs, report = _launch(cluster, tag, TWO_BY_TWO, node_rank=False, accelerator=accelerator,
                           hostnames=["twin", "twin"])
    assert {o["host"] for o in outs} == {"twin"}, report
    _assert_identity_and_one_first_per_node(outs, TWO_BY_TWO, report)
    # rank 0 names the collision and the fix
    warning = [m for m in outs[0]["log"] if m.startswith("WARNING") and "twin" in m]
    assert warning and "NODE_RANK" in warning[0], report


@pytest.mark.timeout(HARD_TIMEOUT + 30)
def test_duplicate_host_names_with_torchrun_variables(cluster) -> None:
    """A launcher that sets LOCAL_RANK / LOCAL_WORLD_SIZE / GROUP_RANK: they are the source."""
    tag = f"twins-vars-{len(os.listdir(cluster.shared_dir))}"
    outs, report = _launch(cluster, tag, TWO_BY_TWO, node_rank=False, accelerator=True,
                           hostnames=["twin", "twin"], launcher_vars=True)
    _assert_identity_and_one_first_per_node(outs, TWO_BY_TWO, report)


@pytest.mark.timeout(HARD_TIMEOUT + 30)
@pytest.mark.parametrize("node_rank", [False, True], ids=["bare", "node_rank"])
def test_doctor_passes_a_healthy_manual_launch(cluster, node_rank) -> None:
    """The doctor with ``--accelerate auto`` (PartialState(cpu=True) here) exits 0 on every rank."""
    report_path = os.path.join(cluster.shared_dir, f"doctor-{node_rank}.json")
    job = cluster.launch("-m", ["accel_utils.doctor", "--timeout", "40", "--accelerate", "auto",
                                "--path", cluster.local_dir, "--json", report_path],
                         placement=TWO_BY_TWO, launcher_vars=False, node_rank=node_rank,
                         timeout=HARD_TIMEOUT)
    results = job.wait()
    described = job.describe()
    assert not job.timed_out, "hard timeout\n" + described
    assert [r.returncode for r in results] == [0, 0, 0, 0], described
    with open(report_path) as fh:
        report = json.load(fh)
    rows = [(r["rank"], r["node"], r["num_nodes"], r["local_rank"], r["local_world_size"])
            for r in report["rows"]]
    assert rows == [(r, *t) for r, t in enumerate(_truth(TWO_BY_TWO))], described
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["launcher"] == "OK" and statuses["accelerate"] == "WARN", described
    assert report["exit_code"] == 0, described
    assert "node-local" in next(c["message"] for c in report["checks"] if c["name"] == "path")
    # the launcher column shows what the launcher set, not what Accelerate wrote afterwards
    assert all("LOCAL_RANK" not in r["launcher"] for r in report["rows"]), described
