"""examples/preprocess_guard.py runs with no arguments (a fresh temporary cache directory)."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.harness import launch_env, run_torchrun

pytestmark = pytest.mark.stack  # .ci/run runs this module again with the floor releases


@pytest.mark.timeout(150)
def test_preprocess_guard_runs_without_arguments(tmp_path) -> None:
    env = launch_env(TMPDIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    (run,) = run_torchrun(["examples/preprocess_guard.py"], nproc_per_node=2, timeout=120, env=env)
    assert run.returncode == 0, run.output[-6000:]
    lines = re.findall(r"^PREPROCESS .*$", run.stdout, re.M)
    assert len(lines) == 2, run.output[-6000:]
    dirs = {re.search(r"cache_dir=(\S+)", line).group(1) for line in lines}
    assert len(dirs) == 1, lines  # both ranks of the node share one fresh directory
    # the local rank 0 tokenized once; rank 1 loaded its cache file from the same directory
    (per_node,) = re.findall(r"^MAP_CALLS (.*)$", run.stdout, re.M)
    assert json.loads(per_node) == {"0": 1}
    assert "SAME_DATASET True" in run.stdout
    (cache_dir,) = dirs
    assert cache_dir.startswith(str(tmp_path))
    assert not os.path.exists(cache_dir)  # the temporary directory is removed at the end
