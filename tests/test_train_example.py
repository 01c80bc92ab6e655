"""The main job, examples/train_tiny_lm.py, in both launch modes (DDP, FSDP2, DeepSpeed ZeRO):
exits 0 and its loss falls."""

from __future__ import annotations

import re
import sys

import pytest

from tests.deepspeed_support import deepspeed_env, require_deepspeed
from tests.harness import free_port, launch_env, run_commands, run_torchrun
from tests.stacks import needs_deepspeed_accumulate

pytestmark = pytest.mark.stack  # .ci/run runs this module again with the floor releases

SHORT = ["--steps", "12", "--num-samples", "256"]


def _summary(runs, cache_dir) -> dict[str, float]:
    (run,) = runs
    assert run.returncode == 0, run.output[-6000:]
    assert "terminate called" not in run.output
    lines = [line for line in run.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, run.output[-6000:]  # the main process only
    fields = dict(re.findall(r"(\w+)=([\d.]+)", lines[0]))
    assert int(fields["steps"]) == 12 and int(fields["tokens"]) > 0
    assert float(fields["tokens_per_s"]) > 0
    assert any(p.name.startswith("tiny_lm_") for p in cache_dir.iterdir())  # prepared once, kept
    return {k: float(v) for k, v in fields.items()}


@pytest.mark.timeout(150)
def test_torchrun_ddp_loss_falls_and_a_straggler_is_named(tmp_path) -> None:
    env = launch_env(HF_HOME=str(tmp_path / "hf"))
    runs = run_torchrun(["examples/train_tiny_lm.py", *SHORT, "--cache-dir", str(tmp_path),
                         "--stall", "2", "--straggle", "1"],
                        nproc_per_node=2, timeout=120, env=env)
    fields = _summary(runs, tmp_path)
    assert fields["final_loss"] < 0.85 * fields["first_loss"], fields
    # rank 1 slept 6 s in step 3's data phase while rank 0 waited in DDP's broadcast
    report = [x for x in runs[0].stderr.splitlines() if x.strip().startswith("rank 1 ")]
    assert report and "step 3" in report[0] and "data" in report[0], runs[0].stderr[-3000:]
    assert "a straggler" in report[0] and "train_tiny_lm.py:" in report[0], report


@pytest.mark.timeout(150)
def test_accelerate_launch_fsdp2_loss_falls(tmp_path) -> None:
    env = launch_env(HF_HOME=str(tmp_path / "hf"))  # no user accelerate config leaks in
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "examples/train_tiny_lm.py", "--fsdp2", *SHORT, "--cache-dir", str(tmp_path),
    ]
    fields = _summary(run_commands([cmd], timeout=120, env=env), tmp_path)
    assert fields["final_loss"] < 0.85 * fields["first_loss"], fields


def _deepspeed(tmp_path) -> dict[str, str]:
    require_deepspeed()
    return deepspeed_env(tmp_path)


@needs_deepspeed_accumulate
@pytest.mark.timeout(150)
def test_torchrun_deepspeed_zero3_loss_falls(tmp_path) -> None:
    runs = run_torchrun(
        ["examples/train_tiny_lm.py", "--deepspeed", "3", *SHORT, "--cache-dir", str(tmp_path)],
        nproc_per_node=2, timeout=120, env=_deepspeed(tmp_path),
    )
    fields = _summary(runs, tmp_path)
    assert fields["final_loss"] < 0.85 * fields["first_loss"], fields


@needs_deepspeed_accumulate
@pytest.mark.timeout(150)
def test_accelerate_launch_deepspeed_config_file_loss_falls(tmp_path) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "examples/accelerate_deepspeed.yaml", "--main_process_port",
        str(free_port()),
        "examples/train_tiny_lm.py", *SHORT, "--cache-dir", str(tmp_path),
    ]
    fields = _summary(run_commands([cmd], timeout=120, env=_deepspeed(tmp_path)), tmp_path)
    assert fields["final_loss"] < 0.85 * fields["first_loss"], fields
