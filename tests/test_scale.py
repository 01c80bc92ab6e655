"""Costs of the side channel that must not grow with the world, and a too-low descriptor limit.

Counts only (descriptors, store requests, mark keys read), never times. The counts come from
benchmarks/scale.py, which runs real lanes and gloo groups (ranks as threads, 8 per process).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from accel_utils import FirstRankPerNode, SideChannelError, barrier_and_log, resolve
from accel_utils._side.timing import POLL_S
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
    # a lazy gloo group: two ring neighbours and the store connections, not world - 1 peers
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
