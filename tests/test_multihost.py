"""Two real-looking hosts (network namespaces, tests/cluster.py): partitions and node identity.

2 nodes x 2 ranks on gloo: ranks 0, 1 on node 0 (10.213.0.10, the store's host), ranks 2, 3 on
node 1 (10.213.0.11). A partition detaches node 1 from the bridge: frames vanish both ways, no
connection is reset. Node 0's ranks must name ranks [2, 3] on node 1 as not responding; node 1's
ranks, cut off from the store's host, must end with "lost the job's store" naming nobody.
No wall times are asserted. Needs root; skipped otherwise unless ACCEL_UTILS_REQUIRE_NETNS=1.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.cluster import bed_for_tests

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts",
                      "partition_worker.py")


@pytest.fixture
def cluster():
    with bed_for_tests() as bed:
        yield bed


def _node0_named_node1(job, results) -> None:
    report = job.describe() + "\nnode 1: " + "; ".join(_node1_outcome(results))
    for res in results:  # nobody may get past the guard or barrier
        assert not res.lines("PASSED"), report
    for res in results[:2]:
        assert res.returncode not in (None, 0), report
        outcome = res.results()
        assert len(outcome) == 1, report
        assert outcome[0]["error"] == "RanksNotRespondingError", report
        assert outcome[0]["ranks"] == [2, 3], report
        # .nodes maps each named rank to its node (JSON keys are strings)
        assert outcome[0]["nodes"] == {"2": 1, "3": 1}, report


def _lost_the_store(job, results) -> None:
    """Node 1's ranks, cut off from the store's host, end with that diagnosis, not blocked."""
    report = job.describe() + "\nnode 1: " + "; ".join(_node1_outcome(results))
    for res in results[2:]:
        assert res.returncode not in (None, 0), report  # None: blocked until the hard timeout
        outcome = res.results()
        assert len(outcome) == 1 and outcome[0]["error"] == "SideChannelError", report
        assert "lost the job's store" in outcome[0]["message"], report
        assert not outcome[0]["ranks"], report  # nobody is named dead without evidence


def _node1_outcome(results) -> list[str]:
    """What node 1's ranks did, for the report."""
    seen = []
    for res in results[2:]:
        outcome = res.results()
        if res.returncode is None:
            seen.append(f"rank {res.rank}: killed by the test's hard timeout")
        elif outcome and "error" in outcome[0]:
            seen.append(f"rank {res.rank}: rc={res.returncode} {outcome[0]['error']}: "
                        f"{outcome[0]['message'][:200]}")
        else:
            seen.append(f"rank {res.rank}: rc={res.returncode} {res.output[-300:]!r}")
    return seen


def test_partition_during_guard_names_node1(cluster):
    """Node 1's first rank works 15 s in its block; node 1 is cut off meanwhile."""
    job = cluster.launch(WORKER, ["guard"], timeout=80)
    assert job.wait_for(2, "WORKING", timeout=60), job.describe()
    time.sleep(1.5)  # heartbeats of the block are running on every member
    cluster.partition(1)
    results = job.wait()  # every rank, or the hard timeout kills what is left (node 1, blocked)
    print("node 1:", *_node1_outcome(results), sep="\n  ")
    _node0_named_node1(job, results)
    _lost_the_store(job, results)


def test_store_host_cut_off_during_a_guard_ends_every_wait(cluster):
    """Node 0 (the store's host) is cut off while every rank waits in a guard with timeout=12 s:
    with 30 s, node 1's ranks were still blocked 110 s later, in store calls of the timeout
    path."""
    job = cluster.launch(WORKER, ["guard_timeout"], timeout=70)
    assert job.wait_for(2, "WORKING", timeout=60), job.describe()
    time.sleep(1.5)
    cluster.partition(0)
    results = job.wait()
    print("node 1:", *_node1_outcome(results), sep="\n  ")
    _lost_the_store(job, results)
    for res in results[:2]:  # node 0 keeps the store: it names node 1's silent ranks
        assert res.returncode not in (None, 0), job.describe()
        assert res.results()[0]["error"] in ("RanksNotRespondingError", "BarrierTimeoutError")


def test_partition_during_barrier_names_node1(cluster):
    """Ranks 0, 2, 3 wait in barrier_and_log("x", liveness=3), node 1 is cut off, rank 1 comes
    later. (A node cut off before its ranks arrive looks like slow ranks: `timeout` finds it.)"""
    job = cluster.launch(WORKER, ["barrier"], timeout=80)
    for rank in range(4):
        assert job.wait_for(rank, "READY", timeout=60), job.describe()
    time.sleep(1.5)  # node 0 is inside the barrier
    cluster.partition(1)
    results = job.wait()  # every rank, or the hard timeout kills what is left (node 1, blocked)
    print("node 1:", *_node1_outcome(results), sep="\n  ")
    _node0_named_node1(job, results)
    _lost_the_store(job, results)


def test_hang_watch_names_a_cut_off_node_not_responding(cluster):
    """Training (an all-reduce a step) under HangWatch(stall=3 s, liveness=4 s, on_stall=
    "exit"); node 1 is cut off: node 0's report names ranks 2, 3 on node 1 as not responding
    (another host: no pid to look at), and the watch ends every process."""
    job = cluster.launch(WORKER, ["hangwatch"], timeout=80)
    for rank in range(4):
        assert job.wait_for(rank, "WORKING", timeout=60), job.describe()
    cluster.partition(1)
    results = job.wait()
    report = job.describe()
    assert [r.returncode for r in results] == [1, 1, 1, 1], report  # none killed by the test
    rows = [x.strip() for x in results[0].output.splitlines()]
    for rank in (2, 3):
        row = next((x for x in rows if x.startswith(f"rank {rank} ")), "")
        assert "not responding" in row and "node 1" in row, report
    assert not results[0].lines("PASSED"), report


@pytest.mark.parametrize("launcher_vars", [True, False], ids=["torchrun_vars", "bare_vars"])
def test_healthy_two_hosts(cluster, launcher_vars):
    """Host names tell the nodes apart; node-local tmpfs vs shared dir pick the order."""
    results = cluster.run(WORKER, ["healthy"], timeout=120, launcher_vars=launcher_vars)
    report = "\n".join(f"rank {r.rank} rc={r.returncode}\n{r.output[-3000:]}" for r in results)
    assert [r.returncode for r in results] == [0, 0, 0, 0], report
    out = [r.results()[0] for r in results]
    assert [o["host"] for o in out] == ["node0", "node0", "node1", "node1"], report
    assert [o["num_nodes"] for o in out] == [2] * 4, report
    assert [o["node_rank"] for o in out] == [0, 0, 1, 1], report
    assert [o["local_rank"] for o in out] == [0, 1, 0, 1], report
    assert [o["local_world_size"] for o in out] == [2] * 4, report
    # local=True on node-local disks: the block runs once per node, each disk has its marker
    assert [o["runs"]["local"]["first"] for o in out] == [True, False, True, False], report
    assert [o["runs"]["local"]["markers"] for o in out] == [
        ["local-rank0"], ["local-rank0"], ["local-rank2"], ["local-rank2"]], report
    # local="auto" on the shared dir: global order, one first rank
    assert [o["runs"]["auto_shared"]["first"] for o in out] == [True, False, False, False], report
    assert all(o["runs"]["auto_shared"]["markers"] == ["auto_shared-rank0"] for o in out), report
    # local="auto" on the node-local tmpfs: not shared, so once per node
    assert [o["runs"]["auto_local"]["first"] for o in out] == [True, False, True, False], report
