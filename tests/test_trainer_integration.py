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
from tests.stacks import (
    fsdp1_plugin,
    needs_fsdp2_plugin,
    needs_trainer_compatible_accelerate,
    sharded_fsdp_plugin,
)

pytestmark = pytest.mark.stack  # .ci/run runs this module again with the floor releases


class _LoopBase:
    """Stands in for Trainer.evaluate / evaluation_loop, which the mixin extends (the real Trainer
    runs in the tests further down; here only the mixin's own behaviour is under test)."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        return self.evaluation_loop(None, "Evaluation", metric_key_prefix=metric_key_prefix).metrics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        return types.SimpleNamespace(metrics={f"{metric_key_prefix}_loss": 1.0})


class _Evaluator(ShardedGenerationEvalMixin, _LoopBase):
    generation_batch_size = 2

    def __init__(self, accelerator, fail_on: int | None = None, short: bool = False) -> None:
        self.accelerator, self.eval_dataset = accelerator, None
        self.model = torch.nn.Linear(2, 2)
        self.fail_on, self.short, self.calls = fail_on, short, []

    def generation_step(self, model, samples, **generate_kwargs):
        self.calls.append((list(samples), generate_kwargs["synced_gpus"], model.training))
        if self.fail_on == dist.get_rank():
            raise ValueError("tokenizer missing")
        return [s * 10 for s in samples][: -1 if self.short else None]


def _mixin_eval(layout: str) -> dict:
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    if layout != "ddp":  # CPU stand-in: Accelerate ignores FSDP plugins on CPU; set what it sets
        acc.state.distributed_type = DistributedType.FSDP  # on GPUs
        acc.state.fsdp_plugin = (FullyShardedDataParallelPlugin(fsdp_version=2)
                                 if layout == "fsdp2" else fsdp1_plugin("FULL_SHARD"))
    ev = _Evaluator(acc)
    ev.generation_samples = list(range(5))
    metrics = ev.evaluate()
    predicted = ev.evaluation_loop(None, "Prediction", metric_key_prefix="test").metrics
    return {"metrics": metrics, "predicted": predicted, "calls": ev.calls,
            "training": ev.model.training}


@pytest.mark.parametrize(
    "layout", ["ddp", "fsdp1", pytest.param("fsdp2", marks=needs_fsdp2_plugin)]
)
def test_mixin_adds_the_generation_metric(layout: str) -> None:
    out = run_distributed(_mixin_eval, 2, layout)
    for o in out:
        assert o["metrics"] == {"eval_loss": 1.0, "eval_generation_score": 20.0}
        assert o["predicted"] == {"test_loss": 1.0}  # predict() gets no generation metric
        assert o["training"] is True  # eval mode only while generating
        assert all(not training for _, _, training in o["calls"])
    if layout != "ddp":  # sharded (FSDP1 full shard, FSDP2): every rank all samples, in lockstep
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


@needs_trainer_compatible_accelerate
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


# ------------------------------------------------------------ a real Trainer on 2 gloo processes


def _tiny_trainer(output_dir: str, generation_samples, eval_dataset, eval_batch_size: int = 3):
    """A real transformers.Trainer (tiny Llama) with the mixin; generation results are the
    samples themselves, so the metric is their mean, and each batch is recorded."""
    from datasets import Dataset
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    class Recording(ShardedGenerationEvalMixin, Trainer):
        batches: list

        def generation_step(self, model, samples, **generate_kwargs):
            self.batches.append(list(samples))
            return [float(s) for s in samples]

    def rows(n: int) -> Dataset:
        ids = [[(i + j) % 16 for j in range(4)] for i in range(n)]
        return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 4] * n})

    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, ddp_backend="gloo", report_to=[],
        per_device_eval_batch_size=eval_batch_size, disable_tqdm=True,
        ddp_find_unused_parameters=False, logging_strategy="no", save_strategy="no",
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)
    datasets = ({name: rows(n) for name, n in eval_dataset.items()}
                if isinstance(eval_dataset, dict) else rows(eval_dataset))
    trainer = Recording(model=LlamaForCausalLM(config), args=args, eval_dataset=datasets,
                        data_collator=default_data_collator)
    trainer.batches = []
    trainer.generation_samples = generation_samples
    return trainer, rows


def _trainer_evaluate(output_dir: str, generation_samples, eval_dataset) -> dict:
    trainer, rows = _tiny_trainer(output_dir, generation_samples, eval_dataset)
    metrics = trainer.evaluate()
    evaluate_batches, trainer.batches = trainer.batches, []
    predicted = trainer.predict(rows(4)).metrics
    logged = [sorted(k for k in entry if "generation" in k) for entry in trainer.state.log_history]
    out = {
        "metrics": {k: v for k, v in metrics.items() if k.endswith(("_loss", "_score"))},
        "batches": evaluate_batches,
        "predict_batches": trainer.batches,
        "predicted": sorted(k for k in predicted if "generation" in k),
        "logged": logged,
    }
    del trainer
    return out


@needs_trainer_compatible_accelerate
def test_trainer_evaluate_uses_the_eval_batch_size_and_predict_adds_nothing(tmp_path) -> None:
    out = run_distributed(_trainer_evaluate, 2, str(tmp_path), list(range(7)), 4, timeout=150)
    for o in out:
        assert set(o["metrics"]) == {"eval_loss", "eval_generation_score"}
        assert o["metrics"]["eval_generation_score"] == 3.0  # mean of 0..6, gathered
        assert o["predicted"] == [] and o["predict_batches"] == []
        assert o["logged"] == [["eval_generation_score"]]  # through Trainer.log, once
    # DDP: disjoint shards of 4 and 3 samples, in batches of per_device_eval_batch_size=3
    assert out[0]["batches"] == [[0, 1, 2], [3]]
    assert out[1]["batches"] == [[4, 5, 6]]


@needs_trainer_compatible_accelerate
def test_trainer_dict_eval_dataset_generates_once_per_evaluate(tmp_path) -> None:
    out = run_distributed(_trainer_evaluate, 2, str(tmp_path), list(range(7)), {"a": 4, "b": 2},
                          timeout=150)
    for o in out:
        # Trainer evaluates each dataset under eval_<name>_; the one sample set is scored once
        assert set(o["metrics"]) == {"eval_a_loss", "eval_b_loss", "eval_generation_score"}
        assert o["metrics"]["eval_generation_score"] == 3.0
        assert o["logged"] == [["eval_generation_score"], []]  # logged with dataset a's metrics
    assert out[0]["batches"] == [[0, 1, 2], [3]] and out[1]["batches"] == [[4, 5, 6]]


@needs_trainer_compatible_accelerate
def test_trainer_sample_sets_by_dataset_name_get_per_dataset_prefixes(tmp_path) -> None:
    samples = {"a": list(range(7)), "b": [10, 20], "extra": [5]}
    out = run_distributed(_trainer_evaluate, 2, str(tmp_path), samples, {"a": 4, "b": 2},
                          timeout=150)
    for o in out:
        assert o["metrics"]["eval_a_generation_score"] == 3.0
        assert o["metrics"]["eval_b_generation_score"] == 15.0
        # a set without a dataset of its name: scored once, with the first dataset
        assert o["metrics"]["eval_extra_generation_score"] == 5.0
        assert "eval_generation_score" not in o["metrics"]
        assert o["logged"] == [["eval_a_generation_score", "eval_extra_generation_score"],
                               ["eval_b_generation_score"]]
    # every set once: a in batches of 3 over 2 shards, b and extra split over the ranks
    assert out[0]["batches"] == [[0, 1, 2], [3], [5], [10]]
    assert out[1]["batches"] == [[4, 5, 6], [20]]  # its part of "extra" is empty


def _training_arguments_shard(output_dir: str) -> dict:
    from accelerate import DistributedType, PartialState

    from accel_utils import dp_eval_sample_shard

    trainer, _ = _tiny_trainer(output_dir, None, 4)
    args = trainer.args
    ddp = dp_eval_sample_shard(args)
    checked = dp_eval_sample_shard(args, dist.get_rank(), 2)
    # CPU stand-in for a Trainer run with FSDP2 (FSDP1 full shard before Accelerate 1.6;
    # Accelerate ignores FSDP on CPU): set what AcceleratorState sets on GPUs (its type,
    # mirrored into PartialState's, and its plugin). The Trainer's state says FSDP, so
    # generation must run in lockstep (None), not sharded.
    trainer.accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.accelerator.state.fsdp_plugin = sharded_fsdp_plugin()
    fsdp = dp_eval_sample_shard(args)
    del trainer
    return {"ddp": ddp, "checked": checked, "fsdp": fsdp}


def test_dp_eval_sample_shard_accepts_training_arguments(tmp_path) -> None:
    out = run_distributed(_training_arguments_shard, 2, str(tmp_path), timeout=150)
    for rank, o in enumerate(out):
        assert o == {"ddp": (rank, 2), "checked": (rank, 2), "fsdp": None}


def _training_arguments_everywhere(output_dir: str, cache: str) -> dict:
    from transformers import TrainingArguments

    from accel_utils import (
        FirstRankPerNode,
        barrier_and_log,
        gather_sharded_results,
        reduce_loss,
        resolve,
        shard_samples,
    )

    # before any Trainer exists, as with training_args.main_process_first(...)
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, ddp_backend="gloo",
                             report_to=[])
    topo = resolve(args)
    with FirstRankPerNode(args) as first:
        seen = os.path.exists(cache)
        if first:
            time.sleep(0.3)
            with open(cache, "w") as fh:
                fh.write("built")
    loss, tokens = reduce_loss([torch.tensor(1.5)], 3, dp_group=args)
    barrier_and_log("after preprocessing", args)
    shard = (topo.rank, topo.world_size)
    gathered = gather_sharded_results([s * 2 for s in shard_samples(range(5), shard)], shard,
                                      group=args)
    return {"rank": topo.rank, "size": topo.world_size, "first": first, "seen": seen,
            "loss": loss.tolist(), "tokens": tokens.tolist(), "gathered": gathered}


def test_training_arguments_are_accepted_wherever_a_group_is(tmp_path) -> None:
    out = run_distributed(_training_arguments_everywhere, 2, str(tmp_path / "out"),
                          str(tmp_path / "cache.txt"), timeout=120)
    for rank, o in enumerate(out):
        assert (o["rank"], o["size"], o["first"]) == (rank, 2, rank == 0)
        assert o["loss"] == [3.0] and o["tokens"] == [6]
        assert o["gathered"] == [0, 2, 4, 6, 8]
    assert [o["seen"] for o in out] == [False, True]  # rank 1 ran its block after rank 0's


# ------------------------------------------------------------ HSDP generation with sampling
def _hsdp_sampling_eval(n: int) -> dict:
    # 2 replicas x 2 shards (FSDP2 on a dp_replicate x dp_shard mesh), a tiny Llama that samples
    # (do_sample=True) and stops early often (half the vocabulary ends a sequence). Each rank's
    # generator differs, as after training: the ranks of one replica draw different tokens and
    # stop after different numbers of steps. With synced_gpus=False (what the mixin passed under
    # HSDP) the FSDP all-gathers inside generate() then pair across calls and the eval hangs.
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=list(range(2, 18)))
    model = LlamaForCausalLM(config).eval()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    acc = Accelerator(cpu=True)  # CPU stand-in for an FSDP2 HSDP run: what Accelerate sets on GPUs
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc.state.device_mesh = mesh

    class Sampling(_Evaluator):
        def generation_step(self, model, samples, **generate_kwargs):
            self.calls.append((list(samples), generate_kwargs["synced_gpus"], model.training))
            ids = torch.tensor([[3 + (s + k) % 20 for k in range(4)] for s in samples])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=True, pad_token_id=0, **generate_kwargs)
            self.steps.append(out.shape[1] - ids.shape[1])
            return [float(s) for s in samples]

    ev = Sampling(acc)
    ev.model, ev.steps = model, []
    ev.generation_samples = list(range(n))
    torch.manual_seed(100 + dist.get_rank())  # each rank's own generator
    metrics = ev.evaluate()
    return {"metrics": metrics, "calls": ev.calls, "steps": ev.steps}


@needs_fsdp2_plugin
def test_hsdp_generation_with_sampling_neither_hangs_nor_misaligns() -> None:
    out = run_distributed(_hsdp_sampling_eval, 4, 5, timeout=90)
    for o in out:
        # every sample scored once (replica 0: 0..2, replica 1: 3..4), gathered on every rank
        assert o["metrics"]["eval_generation_score"] == 2.0
        assert all(synced for _, synced, _ in o["calls"])  # lockstep inside generate()
    # every rank calls generate() equally often: replica 1 (2 samples, one batch) repeats one
    assert [len(o["calls"]) for o in out] == [2, 2, 2, 2]
    assert [c[0] for c in out[0]["calls"]] == [[0, 1], [2]]
    assert [c[0] for c in out[2]["calls"]] == [[3, 4], [3]]
    # the premise: the ranks of each replica sampled sequences of different lengths (unsynced,
    # their FSDP collectives paired across calls); synced, they still finished together
    assert out[0]["steps"] != out[1]["steps"] and out[2]["steps"] != out[3]["steps"]


def _trainer_with_watch(output_dir: str) -> dict:
    """A real Trainer with HangWatchCallback; rank 1's fourth forward sleeps past the stall."""
    import logging

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from accel_utils.integrations.callbacks import HangWatchCallback

    class Slow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(2, 1), 0

        def forward(self, x, labels):
            self.calls += 1
            if self.calls == 4 and dist.get_rank() == 1:
                time.sleep(5)  # the slow forward
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    data = Dataset.from_dict({"x": [[float(i % 4), 1.0] for i in range(64)],
                              "labels": [float(i % 4) for i in range(64)]})
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, ddp_backend="gloo",
                             report_to=[], per_device_train_batch_size=2, max_steps=8,
                             disable_tqdm=True, logging_strategy="no", save_strategy="no",
                             ddp_find_unused_parameters=False)
    callback = HangWatchCallback(stall=1.5, liveness=4)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("accel_utils.hang_watch").addHandler(handler)
    try:
        Trainer(model=Slow(), args=args, train_dataset=data, callbacks=[callback]).train()
    finally:
        logging.getLogger("accel_utils.hang_watch").removeHandler(handler)
    return {"log": "\n".join(lines), "watch_left": callback.watch is None}


@needs_trainer_compatible_accelerate
def test_hang_watch_callback_names_a_slow_rank_in_a_real_trainer(tmp_path) -> None:
    out = run_distributed(_trainer_with_watch, 2, str(tmp_path), timeout=120)
    with open(__file__) as source:
        sleep = next(i for i, x in enumerate(source.read().splitlines(), 1)
                     if "# the slow forward" in x and "next(" not in x)
    log = out[0]["log"]
    line = next(x for x in log.splitlines() if x.strip().startswith("rank 1 "))
    assert f"test_trainer_integration.py:{sleep}" in line and "step 4" in line, log
    assert "forward-backward" in line, log
    assert all(o["watch_left"] for o in out)  # on_train_end ended the watch
