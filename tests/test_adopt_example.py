"""examples/adopt_accelerate.py: an Accelerate script moved onto accel-utils by a small diff.

The original (docs/snippets/adopt_accelerate_before.py) and the port run under torchrun on 2
processes: both exit 0, preprocess once, and log the same losses and eval metric; the diff the
docs show is the diff between the two files.
"""

from __future__ import annotations

import difflib
import json
import os

import pytest

from tests.harness import REPO_ROOT, launch_env, run_torchrun

pytestmark = pytest.mark.stack  # .ci/run runs this module again with the floor releases

BEFORE = "docs/snippets/adopt_accelerate_before.py"
AFTER = "examples/adopt_accelerate.py"
DIFF = "docs/snippets/adopt_accelerate.diff"


def unified_diff() -> str:
    """What docs/snippets/adopt_accelerate.diff holds: the port, as ``diff -u`` shows it."""
    texts = []
    for path in (BEFORE, AFTER):
        with open(os.path.join(REPO_ROOT, path)) as fh:
            texts.append(fh.readlines())
    lines = difflib.unified_diff(*texts, "train.py (Accelerate)", "train.py (accel-utils)", n=2)
    return "".join(lines)


def test_the_documented_diff_is_the_diff_between_the_scripts() -> None:
    with open(os.path.join(REPO_ROOT, DIFF)) as fh:
        assert fh.read() == unified_diff(), f"regenerate {DIFF}: python -m tests.test_adopt_example"


def _run(script: str, cache_dir: str) -> dict:
    runs = run_torchrun([script, "--cache-dir", cache_dir], nproc_per_node=2, timeout=240,
                        env=launch_env())
    (run,) = runs
    assert run.returncode == 0, run.output[-6000:]
    assert "terminate called" not in run.output
    lines = run.stdout.splitlines()
    [metrics] = [json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("METRICS ")]
    return metrics | {"data": sorted(ln for ln in lines if ln.startswith("DATA "))}


@pytest.mark.timeout(540)
def test_the_port_runs_under_torchrun_and_matches_the_original(tmp_path) -> None:
    port = _run(AFTER, str(tmp_path / "port"))
    assert port["data"] == ["DATA rank 0 built", "DATA rank 1 loaded"]  # preprocessed once
    assert (port["world_size"], port["eval_samples"]) == (2, 32)  # every eval sample, once
    losses = port["step_losses"]
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0], losses
    assert 0 < port["eval_accuracy"] <= 1
    original = _run(BEFORE, str(tmp_path / "original"))
    assert original["data"] == port["data"]
    # the same training (gradients synced once per step, same scaling); the logged loss only
    # differs in rounding (reduce_loss sums in float64)
    assert losses == pytest.approx(original["step_losses"], rel=1e-5)
    assert port["eval_accuracy"] == pytest.approx(original["eval_accuracy"], abs=1e-6)
    assert port["eval_samples"] == original["eval_samples"]


if __name__ == "__main__":  # regenerate the documented diff
    with open(os.path.join(REPO_ROOT, DIFF), "w") as out:
        out.write(unified_diff())
