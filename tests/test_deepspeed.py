"""A real DeepSpeed engine (ZeRO 0-3, two CPU processes on gloo) through every function.

Every test launches tests/scripts/deepspeed_worker.py (or the doctor) in fresh processes: under
torchrun with ``deepspeed.initialize``, under torchrun with ``Accelerator(deepspeed_plugin=...)``,
and under ``accelerate launch --config_file`` with a DeepSpeed config as users write it. The
worker compares every step with a plain DDP model fed the same micro-batches.

Skipped without deepspeed (the ``deepspeed`` extra); ``.ci/run`` sets
``ACCEL_UTILS_REQUIRE_DEEPSPEED=1`` so that there a missing install fails instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.deepspeed_support import deepspeed_env, require_deepspeed
from tests.harness import free_port, run_commands, run_torchrun

require_deepspeed()

WORKER = "tests/scripts/deepspeed_worker.py"
STAGES = ("0", "1", "2", "3")
TOLERANCE = 1e-6  # float32 sums in another order: ZeRO reduces partitions, DDP buckets

# As users write it (``accelerate config``); gradient_clipping 0 keeps the DDP reference exact.
CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  gradient_accumulation_steps: 2
  gradient_clipping: 0.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
"""


def _reports(runs, out: Path) -> list[dict]:
    (run,) = runs
    assert run.returncode == 0, run.output[-8000:]
    assert "DeepSpeed deepspeed.ops.comm" not in run.output  # no op was built
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _accelerate_launch(tmp_path: Path, target: list[str]) -> list:
    config = tmp_path / "deepspeed.yaml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), *target]
    return run_commands([cmd], timeout=150, env=deepspeed_env(tmp_path))


def _assert_matches_ddp(stage: str, result: dict, rank: int) -> None:
    """Training, loss reduction and eval sharding of one stage on one rank."""
    assert result["stage"] == int(stage)
    assert result["inside_no_sync"] is False, "get_sync_ctx entered the engine's no_sync"
    assert result["global_steps"] == 3  # one optimizer step per accumulation cycle of 2
    assert result["loss_diff"] <= TOLERANCE and result["param_diff"] <= TOLERANCE, result
    assert result.get("grad_diff", 0.0) <= TOLERANCE, result
    for (loss, tokens), (want_loss, want_tokens) in result["reduce_loss"]:
        assert tokens == want_tokens == 16 and loss == pytest.approx(want_loss, rel=1e-6)
    # ZeRO-0..2 hold a full replica per rank: a shard each; ZeRO-3 scores every sample in
    # lockstep (each forward gathers parameters from both ranks)
    want = None if stage == "3" else [rank, 2]
    assert result["shard"] == want
    assert result["eval_forwards"] == (7 if stage == "3" else 4 - rank)  # 7 samples: 4 + 3
    assert result["metric_sharded"] == pytest.approx(result["metric_unsharded"], rel=1e-12)


@pytest.mark.timeout(200)
def test_deepspeed_initialize_every_stage_matches_ddp(tmp_path) -> None:
    runs = run_torchrun([WORKER, "--mode", "raw", "--out", str(tmp_path)], timeout=150,
                        env=deepspeed_env(tmp_path))
    for rank, report in enumerate(_reports(runs, tmp_path)):
        assert sorted(report["stages"]) == list(STAGES)
        for stage, result in report["stages"].items():
            assert result["grad_diff"] <= TOLERANCE, (stage, result)
            _assert_matches_ddp(stage, result, rank)


@pytest.mark.timeout(200)
def test_accelerator_deepspeed_plugin_every_stage_matches_ddp(tmp_path) -> None:
    runs = run_torchrun([WORKER, "--mode", "accelerate", "--out", str(tmp_path)], timeout=150,
                        env=deepspeed_env(tmp_path))
    reports = _reports(runs, tmp_path)
    assert [r["map_calls"] for r in reports] == [1, 0]  # FirstRankPerNode: rank 0 mapped once
    for rank, report in enumerate(reports):
        assert sorted(report["stages"]) == list(STAGES)
        for stage, result in report["stages"].items():
            assert result["type"] == "DeepSpeedEngine" and result["num_processes"] == 2
            assert result["syncs"] == [False, True] * 3
            assert result["shard_from_accelerator"] == result["shard"]
            _assert_matches_ddp(stage, result, rank)
        # Accelerate names no backend for DeepSpeed without GPUs and reports one process per
        # rank; accel_utils trusts torch.distributed and says how to make them agree
        plain = report["without_backend"]
        assert plain["num_processes"] == 1
        assert plain["shard"] == [rank, 2] and plain["reduced"] == [2.0, 2]
        assert plain["warnings"] and all('backend="gloo"' in w for w in plain["warnings"])


@pytest.mark.timeout(200)
def test_accelerate_launch_config_file_zero3(tmp_path) -> None:
    runs = _accelerate_launch(
        tmp_path, [WORKER, "--mode", "accelerate", "--stages", "launch", "--out", str(tmp_path)]
    )
    reports = _reports(runs, tmp_path)
    assert [r["map_calls"] for r in reports] == [1, 0]
    for rank, report in enumerate(reports):
        assert list(report["stages"]) == ["3"]
        result = report["stages"]["3"]
        assert result["num_processes"] == 2 and result["syncs"] == [False, True] * 3
        assert result["shard_from_accelerator"] is None
        _assert_matches_ddp("3", result, rank)


@pytest.mark.timeout(200)
def test_doctor_under_accelerate_deepspeed_launch(tmp_path) -> None:
    out = tmp_path / "report.json"
    (run,) = _accelerate_launch(
        tmp_path, ["-m", "accel_utils.doctor", "--json", str(out), "--timeout", "30"]
    )
    assert run.returncode == 0, run.output[-6000:]
    report = json.loads(out.read_text())
    assert report["exit_code"] == 0 and report["failures"] == []
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["launcher"] == statuses["accelerate"] == statuses["side channel"] == "OK"
    rows = [(r["rank"], r["local_rank"], r["backend"], r["accelerate"]["num_processes"])
            for r in report["rows"]]
    assert rows == [(0, 0, "gloo", 2), (1, 1, "gloo", 2)]
    assert "all checks passed: exit 0" in run.stdout
