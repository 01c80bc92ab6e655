"""Costs of the side channel that must not grow with the world, and a too-low descriptor limit.

Counts only (hops, messages, descriptors, store requests and connections, mark keys read), never
times. The simulated worlds come from benchmarks/scale.py, which runs real lanes and gloo groups
(ranks as threads, 8 per process).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from accel_utils import FirstRankPerNode, SideChannelError, barrier_and_log, resolve
from accel_utils._side import lane_for, life, tree
from accel_utils._side.timing import POLL_S
from accel_utils._side.wire import Kind
from accel_utils.barriers import _barrier_with_timeout
from tests.harness import REPO_ROOT, launch_env, run_distributed


@pytest.mark.timeout(240)
def test_per_rank_costs_do_not_grow_with_the_world(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--world-sizes", "8", "24", "--ops", "3",
         "--wait", "3", "--out", str(tmp_path)],
        cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["series"]["this tree"]
    small, large = rows[0], rows[1]
    assert (small["world"], large["world"]) == (8, 24)
    # the tree: 2 x ceil(log2 world) hops, where gloo's ring all-reduce took 2 x (world - 1)
    assert [r["op_hops"] for r in rows] == [6, 8, 20, 26, 32], rows  # 8, 24, then extrapolated
    assert rows[-1]["world"] == 65536 and rows[-1]["creation_hops"] == 32, rows
    # a rank sends about 2 messages per operation (one up, one to each child ...), 16 at most
    assert all(r["msgs_mean"] < 2 for r in rows) and rows[-1]["msgs_max"] == 16, rows
    # creating: its address, one look-up per tree neighbour (~2, more if it polls), its mark
    assert small["creation_requests"] <= 6 and large["creation_requests"] <= 6, rows
    # a lazy gloo group: tree neighbours and the store connection, not world - 1 peers
    assert large["fds_per_rank"] <= 12, rows  # was 30 at 24 ranks (full mesh)
    assert large["fds_per_rank"] <= small["fds_per_rank"] + 1, rows
    # a waiting rank reads its two neighbours' marks, not everyone's: keys per request
    for row in (small, large):
        assert row["keys_s_per_node_fast"] <= 2 * row["store_req_s_per_node_fast"], rows
    assert {"scale.md", "scale.png"} <= set(os.listdir(tmp_path))


def _low_descriptor_limit(short_ranks: list[int]) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    group = dist.new_group(backend="gloo")  # a fresh parent: its side group is created here
    _ = resolve(group).nodes  # its one gather (and any descriptors it opens) before the limit
    # the gather's lane is closed: its thread ends within a poll, its connection with it
    time.sleep(2 * POLL_S)
    gc.collect()
    held: list[int] = []
    if dist.get_rank() in short_ranks:  # 4 descriptors free, however many close meanwhile
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
        with contextlib.suppress(OSError):
            while True:
                held.extend(os.pipe())
        for _ in range(4):
            os.close(held.pop())
    try:
        with FirstRankPerNode(group, timeout=timedelta(seconds=60), liveness=10):
            pass
        return {"passed": True}
    except SideChannelError as exc:
        return {"error": type(exc).__name__, "ranks": exc.ranks, "message": str(exc)}
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        barrier_and_log("limit restored", group=group)  # the channel works again afterwards


@pytest.mark.parametrize("short_ranks", [[2], [0, 1, 2, 3]], ids=["one_rank", "every_rank"])
def test_too_low_descriptor_limit_is_a_clear_error_on_every_rank(short_ranks) -> None:
    # fresh processes: in pooled ones, what earlier tests left could close while the limit is
    # low and give rank 2 the descriptors it should lack (CI saw every rank pass)
    out = run_distributed(_low_descriptor_limit, 4, short_ranks, timeout=90, fresh=True)
    for rank, res in enumerate(out):
        assert res.get("error") == "SideChannelError", (rank, out)
        assert "RLIMIT_NOFILE" in res["message"] and "ulimit -n" in res["message"], res
        assert len(res["ranks"]) == 1 and res["ranks"][0] in short_ranks, res
        assert f"rank {res['ranks'][0]} cannot open" in res["message"], res


def test_the_tree_reaches_every_member_once_within_its_depth() -> None:
    for size in [*range(1, 300), 1024, 8191, 8192, 65536]:
        hops = {0: 0}
        for rank in range(1, size):  # a parent is numbered lower, so it is reached first
            up = tree.parent(rank)
            assert up is not None and up < rank and rank in tree.children(up, size), size
            hops[rank] = hops[up] + 1
        assert sum(len(tree.children(r, size)) for r in range(size)) == size - 1, size
        for rank in range(size):  # a subtree is the contiguous range of ranks a gather sends up
            assert tree.span(rank, size) == 1 + sum(tree.span(c, size)
                                                    for c in tree.children(rank, size)), size
        assert 2 * max(hops.values()) == tree.depth(size) <= 2 * math.ceil(math.log2(size)), size


def _or_of_every_member() -> dict:
    lane = lane_for(dist.group.WORLD)
    limit = timedelta(seconds=30)
    got = [lane.run(lane.begin(), Kind.PROBE, "or", "test", limit, None,
                    payload=1 << (dist.get_rank() + shift)).payload for shift in (0, 7)]
    return {"got": got, "size": dist.get_world_size()}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_an_operation_is_the_or_of_every_members_words(world) -> None:
    for res in run_distributed(_or_of_every_member, world):
        everyone = (1 << world) - 1
        assert res["got"] == [everyone, everyone << 7], res


def _gather_of_every_member() -> list[bytes]:
    lane = lane_for(dist.group.WORLD)
    rank, limit = dist.get_rank(), timedelta(seconds=30)
    first = lane.gather(lane.begin(), "test", b"x" * rank, limit, None)  # rank 0's is empty
    assert lane.gather(lane.begin(), "test", b"", limit, None) == [b""] * dist.get_world_size()
    return first


@pytest.mark.parametrize("world", [3, 4])
def test_a_gather_brings_every_members_bytes_in_rank_order(world) -> None:
    for res in run_distributed(_gather_of_every_member, world):
        assert res == [b"x" * r for r in range(world)], res


def _store_connections() -> int:
    """This process's open connections to the job's store (TCP, to MASTER_PORT)."""
    port, sockets = int(os.environ["MASTER_PORT"]), set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                sockets.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()  # remote address:port, state (01: established), inode
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                count += fields[3] == "01" and remote_port == port and fields[9] in sockets
    return count


def _connections_while_the_side_channel_works() -> dict:
    assert _barrier_with_timeout(timedelta(seconds=30))  # the lanes' connection exists
    assert life.beat_now(10)  # and the sign of life's (its thread opens it in the background)
    before = _store_connections()
    pair = dist.new_group([0, 1], backend="gloo")
    if dist.get_rank() in (0, 1):  # a lane and a group on a subgroup
        with FirstRankPerNode(pair):
            pass
    if dist.get_rank() == 1:  # a timed-out operation, then a group rebuilt for the next one
        time.sleep(2.0)
    late = _barrier_with_timeout(timedelta(seconds=0.5))
    again = _barrier_with_timeout(timedelta(seconds=30))
    loader = threading.Thread(target=barrier_and_log, args=("a thread's lane",), name="loader")
    loader.start()
    loader.join()
    return {"before": before, "after": _store_connections(), "late": late, "again": again}


def test_lanes_and_side_groups_open_no_store_connection() -> None:
    # Each new connection costs the store's one thread a reverse-DNS look-up of the client,
    # which stalls the whole job's store for 5 s when the resolver drops it (every time where
    # reverse DNS is broken): lanes, groups and rebuilds use the process's one side connection.
    out = run_distributed(_connections_while_the_side_channel_works, 4, timeout=90, fresh=True)
    assert not any(res["late"] for res in out), out  # the rebuild path ran
    assert all(res["again"] for res in out), out
    for res in out:
        assert res["before"] >= 1 and res["after"] == res["before"], out
