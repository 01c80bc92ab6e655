"""The Trainer integration: the mixin on real gloo groups, and examples/trainer_subclass.py."""

from __future__ import annotations

import json
import os
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist

from accel_utils.integrations.trainer import ShardedGenerationEvalMixin
from tests.harness import launch_env, run_commands, run_distributed, run_torchrun


class _LoopBase:
    """Stands in for Trainer.evaluation_loop, which the mixin extends (the real Trainer runs in
    the example test below; here only the mixin's own behaviour is under test)."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        return types.SimpleNamespace(metrics={f"{metric_key_prefix}_loss": 1.0})


class _Evaluator(ShardedGenerationEvalMixin, _LoopBase):
    generation_batch_size = 2

    def __init__(self, accelerator, fail_on: int | None = None, short: bool = False) -> None:
        self.accelerator = accelerator
        self.model = torch.nn.Linear(2, 2)
        self.fail_on, self.short, self.calls = fail_on, short, []

    def generation_step(self, model, samples, **generate_kwargs):
        self.calls.append((list(samples), generate_kwargs["synced_gpus"], model.training))
        if self.fail_on == dist.get_rank():
            raise ValueError("tokenizer missing")
        return [s * 10 for s in samples][: -1 if self.short else None]


def _mixin_eval(fsdp2: bool) -> dict:
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    if fsdp2:  # CPU stand-in: Accelerate ignores FSDP plugins on CPU; set what it sets on GPUs
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    ev = _Evaluator(acc)
    ev.generation_samples = list(range(5))
    metrics = ev.evaluation_loop(None, "Evaluation", metric_key_prefix="eval").metrics
    predicted = ev.evaluation_loop(None, "Prediction", metric_key_prefix="test").metrics
    return {"metrics": metrics, "predicted": predicted, "calls": ev.calls,
            "training": ev.model.training}


@pytest.mark.parametrize("fsdp2", [False, True])
def test_mixin_adds_the_generation_metric(fsdp2: bool) -> None:
    out = run_distributed(_mixin_eval, 2, fsdp2)
    for o in out:
        assert o["metrics"] == {"eval_loss": 1.0, "eval_generation_score": 20.0}
        assert o["predicted"] == {"test_loss": 1.0}  # predict() gets no generation metric
        assert o["training"] is True  # eval mode only while generating
        assert all(not training for _, _, training in o["calls"])
    if fsdp2:  # lockstep: every rank all samples, synced_gpus on
        expected = [([0, 1], True, False), ([2, 3], True, False), ([4], True, False)]
        assert out[0]["calls"] == out[1]["calls"] == expected
    else:  # DDP: disjoint shards, no cross-rank sync inside generate
        assert [c[0] for c in out[0]["calls"]] == [[0, 1], [2]]
        assert [c[0] for c in out[1]["calls"]] == [[3, 4]]
        assert all(not synced for o in out for _, synced, _ in o["calls"])


def _mixin_failure(fail_on: int | None, short: bool) -> str:
    from accelerate import Accelerator

    ev = _Evaluator(Accelerator(cpu=True), fail_on=fail_on, short=short)
    ev.generation_samples = list(range(6))
    try:
        ev.generation_evaluate()
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_failing_rank_fails_every_rank_instead_of_hanging() -> None:
    out = run_distributed(_mixin_failure, 2, 1, False, timeout=30)
    assert out[1] == "ValueError: tokenizer missing"
    assert out[0].startswith("RuntimeError") and "rank(s) {1:" in out[0]
    assert "tokenizer missing" in out[0]
    short = run_distributed(_mixin_failure, 2, None, True, timeout=30)
    assert all(s.startswith("ValueError: generation_step returned 1 results for 2") for s in short)


def _prepare(path: str) -> tuple:
    from accelerate import Accelerator

    ev = _Evaluator(Accelerator(cpu=True))

    def build() -> bool:
        if dist.get_rank() == 0:
            time.sleep(0.3)  # without the guard rank 1 would look first and build it itself
        seen = os.path.exists(path)
        if not seen:
            with open(path, "w") as fh:
                fh.write(f"built by rank {dist.get_rank()}")
        return seen

    return ev.prepare_dataset(build), open(path).read()


def test_prepare_dataset_runs_first_on_the_first_rank(tmp_path) -> None:
    out = run_distributed(_prepare, 2, str(tmp_path / "cache.txt"))
    assert out == [(False, "built by rank 0"), (True, "built by rank 0")]


def _metrics(runs) -> dict:
    for run in runs:
        assert run.returncode == 0, run.output[-4000:]
        assert "terminate called" not in run.output
    lines = [line for run in runs for line in run.stdout.splitlines()]
    [metrics] = [json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("METRICS ")]
    return metrics | {"data": sorted(ln for ln in lines if ln.startswith("DATA "))}


@pytest.mark.timeout(240)
def test_example_under_torchrun_matches_one_process(tmp_path) -> None:
    example = ["examples/trainer_subclass.py", "--steps", "20"]
    two = _metrics(run_torchrun([*example, "--output-dir", str(tmp_path / "two")], nproc_per_node=2,
                                env=launch_env()))
    one = _metrics(run_commands([[sys.executable, *example, "--output-dir", str(tmp_path / "one")]],
                                timeout=120))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["data"] == ["DATA rank 0 built", "DATA rank 1 loaded"]
    assert two["eval_generation_samples"] == one["eval_generation_samples"] == 24
    # the sharded generation metric is the single-process one, and it is what the Trainer logged
    assert two["eval_continuation_accuracy"] == one["eval_continuation_accuracy"] > 0
    assert two["logged_accuracy"] == two["eval_continuation_accuracy"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
