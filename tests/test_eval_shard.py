"""Eval sharding: every distributed_config form, and generation evals on real gloo groups."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from accel_utils import dp_eval_sample_shard, gather_sharded_results, shard_samples
from accel_utils.eval_samples import _merge
from tests.harness import run_distributed
from tests.stacks import fsdp1_plugin, needs_parallelism_config

pytestmark = pytest.mark.stack  # .ci/run runs this module again with the floor releases

VOCAB, PROMPT, NEW = 32, 5, 4


# ---------------------------------------------------------------- a tiny generation eval
def _tiny_lm() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def _samples(n: int) -> list[tuple[int, list[int]]]:
    gen = torch.Generator().manual_seed(1)
    return [(i, torch.randint(3, VOCAB, (PROMPT,), generator=gen).tolist()) for i in range(n)]


def _score(model, samples, synced_gpus: bool) -> list[tuple[int, list[int]]]:
    """(sample id, generated tokens) per sample, in batches of 2."""
    results = []
    for start in range(0, len(samples), 2):
        batch = samples[start:start + 2]
        ids = torch.tensor([prompt for _, prompt in batch])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                synced_gpus=synced_gpus, pad_token_id=0,
            )
        results += [(sid, _until_eos(row[PROMPT:].tolist()))
                    for (sid, _), row in zip(batch, out, strict=True)]
    return results


def _until_eos(tokens: list[int]) -> list[int]:
    # what follows EOS is padding, whose length depends on the batch a sample shared
    return tokens[: tokens.index(2) + 1] if 2 in tokens else tokens


def _metric(samples, results) -> float:
    """Share of the NEW target tokens, (last prompt token + step) % VOCAB, that were generated."""
    prompts = dict(samples)
    hits = [
        tok == (prompts[sid][-1] + k + 1) % VOCAB
        for sid, toks in results
        for k, tok in enumerate(toks)
    ]
    return sum(hits) / max(1, NEW * len(results))


@contextlib.contextmanager
def _counted(owner, name: str):
    """Count the calls of ``owner.<name>``; the real function runs."""
    real, calls = getattr(owner, name), []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(owner, name, counting)
    try:
        yield calls
    finally:
        setattr(owner, name, real)


def _eval(model, generating_model, samples) -> dict:
    shard = dp_eval_sample_shard(model)
    mine = shard_samples(samples, shard)
    with _counted(generating_model, "generate") as calls:
        local = _score(generating_model, mine, synced_gpus=shard is None)
    results = gather_sharded_results(local, shard)
    return {"shard": shard, "mine": [sid for sid, _ in mine], "ids": [sid for sid, _ in results],
            "metric": _metric(samples, results), "calls": len(calls)}


def _reference(samples) -> float:
    model = _tiny_lm()
    return _metric(samples, _score(model, samples, synced_gpus=False))


# ---------------------------------------------------------------- DDP, FSDP2, HSDP evals
def _ddp_eval(n: int) -> dict:
    samples = _samples(n)
    reference = _reference(samples)  # one process, whole sample set, no collectives
    ddp = torch.nn.parallel.DistributedDataParallel(_tiny_lm())
    return _eval(ddp, ddp.module, samples) | {"reference": reference}


def test_ddp_eval_scores_every_sample_once_with_the_single_process_metric() -> None:
    out = run_distributed(_ddp_eval, 2, 7)
    assert [o["shard"] for o in out] == [(0, 2), (1, 2)]
    assert out[0]["mine"] == [0, 1, 2, 3] and out[1]["mine"] == [4, 5, 6]
    for o in out:
        assert o["ids"] == list(range(7))
        assert o["metric"] == o["reference"] == out[0]["reference"]
    assert [o["calls"] for o in out] == [2, 2]


def _fsdp2_eval(n: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    samples = _samples(n)
    model = _tiny_lm()
    reference = _metric(samples, _score(copy.deepcopy(model), samples, synced_gpus=False))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return _eval(model, model, samples) | {"reference": reference}


def test_fsdp2_eval_keeps_every_rank_on_all_samples() -> None:
    out = run_distributed(_fsdp2_eval, 2, 5)
    for o in out:
        assert o["shard"] is None
        assert o["mine"] == o["ids"] == list(range(5))
        assert o["metric"] == o["reference"]
    assert out[0]["calls"] == out[1]["calls"] == 3


def _hsdp_eval(n: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    samples = _samples(n)
    model = _tiny_lm()
    reference = _metric(samples, _score(copy.deepcopy(model), samples, synced_gpus=False))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _eval(model, model, samples) | {"reference": reference}


def test_hsdp_eval_shards_over_replicas_only() -> None:
    out = run_distributed(_hsdp_eval, 4, 5, timeout=90)
    assert [o["shard"] for o in out] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    # the ranks of one replica score identical samples; the replicas split them
    assert out[0]["mine"] == out[1]["mine"] == [0, 1, 2]
    assert out[2]["mine"] == out[3]["mine"] == [3, 4]
    # replicas made different numbers of generate() calls without desyncing
    assert [o["calls"] for o in out] == [2, 2, 1, 1]
    for o in out:
        assert o["ids"] == list(range(5))
        assert o["metric"] == o["reference"]


# ---------------------------------------------------------------- the model form
def _model_forms() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    rank = dist.get_rank()
    plain = torch.nn.Linear(4, 4)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    pair = dist.new_group([0, 1]), dist.new_group([2, 3])
    sub_ddp = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Linear(4, 4), process_group=pair[rank // 2]
    )
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))
    fsdp = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh=flat)
    hsdp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    hsdp = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh=hsdp_mesh)
    torch_names = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch_named = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh=torch_names)
    tp_mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    colwise = {"0": ColwiseParallel()}
    tp = parallelize_module(torch.nn.Sequential(torch.nn.Linear(4, 4)), tp_mesh, colwise)
    fsdp_tp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    fsdp_tp = parallelize_module(
        torch.nn.Sequential(torch.nn.Linear(4, 4)), fsdp_tp_mesh["tp"], colwise
    )
    fsdp_tp = fully_shard(fsdp_tp, mesh=fsdp_tp_mesh["dp_shard"])
    errors = {}
    for name, call in {"plain": lambda: dp_eval_sample_shard(plain, 0, 3),
                       "fsdp": lambda: dp_eval_sample_shard(fsdp, (rank + 1) % 4, 4)}.items():
        try:
            call()
        except ValueError as exc:
            errors[name] = str(exc)
    return {
        "plain": dp_eval_sample_shard(plain),
        "plain_seed_style": dp_eval_sample_shard(plain, rank, 4),
        "ddp": dp_eval_sample_shard(ddp),
        "compiled_ddp": dp_eval_sample_shard(torch.compile(ddp)),
        "sub_ddp": dp_eval_sample_shard(sub_ddp),
        "fsdp": dp_eval_sample_shard(fsdp),
        "hsdp": dp_eval_sample_shard(hsdp),
        "hsdp_seed_style": dp_eval_sample_shard(hsdp, rank, 4),
        "torch_named_hsdp": dp_eval_sample_shard(torch_named),
        "tp": dp_eval_sample_shard(tp),
        "fsdp_tp": dp_eval_sample_shard(fsdp_tp),
        "errors": errors,
    }


def test_model_form_reads_the_layout_from_the_model() -> None:
    out = run_distributed(_model_forms, 4, timeout=90)
    for rank, o in enumerate(out):
        assert o["plain"] == o["plain_seed_style"] == o["ddp"] == o["compiled_ddp"] == (rank, 4)
        assert o["sub_ddp"] == (rank % 2, 2)
        assert o["fsdp"] is None and o["tp"] is None and o["fsdp_tp"] is None
        assert o["hsdp"] == o["hsdp_seed_style"] == o["torch_named_hsdp"] == (rank // 2, 2)
        assert "disagree" in o["errors"]["plain"] and "disagree" in o["errors"]["fsdp"]


def test_model_form_single_process() -> None:
    # a real DeepSpeed engine (every ZeRO stage) is in tests/test_deepspeed.py
    assert dp_eval_sample_shard(torch.nn.Linear(2, 2)) is None  # one process: nothing to shard


# ---------------------------------------------------------------- the Accelerator form
# Accelerate builds only MULTI_CPU Accelerators on CPU: it ignores an FSDP plugin and (1.10+)
# refuses a ParallelismConfig. So each case sets, after construction, the state fields that
# Accelerate sets on GPUs (distributed_type, fsdp_plugin, deepspeed plugin, parallelism_config,
# device_mesh) and asks dp_eval_sample_shard about that state.
def _accelerator_forms() -> dict:
    from accelerate import Accelerator, DistributedType

    rank = dist.get_rank()
    acc = Accelerator(cpu=True)
    state = acc.state
    out = {"multi_cpu": dp_eval_sample_shard(acc), "seed_style": dp_eval_sample_shard(acc, rank, 4)}
    try:
        dp_eval_sample_shard(acc, 0, 2)
    except ValueError as exc:
        out["mismatch"] = str(exc)
    state.distributed_type = DistributedType.FSDP
    for strategy in ("NO_SHARD", "FULL_SHARD", "SHARD_GRAD_OP"):
        state.fsdp_plugin = fsdp1_plugin(strategy)
        out[f"fsdp1_{strategy}"] = dp_eval_sample_shard(acc)
    return out


def test_accelerator_forms() -> None:
    out = run_distributed(_accelerator_forms, 4, timeout=90)
    for rank, o in enumerate(out):
        assert o["multi_cpu"] == o["seed_style"] == o["fsdp1_NO_SHARD"] == (rank, 4)
        assert "disagree" in o["mismatch"]
        assert o["fsdp1_FULL_SHARD"] is None and o["fsdp1_SHARD_GRAD_OP"] is None


def _accelerator_forms_fsdp2_and_meshes() -> dict:
    from accelerate import Accelerator, DistributedType, ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    state = acc.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    out = {"fsdp2": dp_eval_sample_shard(acc)}
    for name, pc in {
        "hsdp": ParallelismConfig(dp_replicate_size=2, dp_shard_size=2),
        "fsdp_tp": ParallelismConfig(dp_shard_size=2, tp_size=2),
    }.items():
        state.parallelism_config = pc
        state.device_mesh = pc.build_device_mesh("cpu")
        out[name] = dp_eval_sample_shard(acc)
    hsdp_config = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)
    out["hsdp_config_from_world"] = dp_eval_sample_shard(hsdp_config)
    state.distributed_type = DistributedType.MULTI_CPU
    pc = ParallelismConfig(tp_size=4)
    state.parallelism_config, state.device_mesh = pc, pc.build_device_mesh("cpu")
    out["pure_tp"] = dp_eval_sample_shard(acc)
    return out


@needs_parallelism_config  # FSDP2 through Accelerate (1.6) is asked here too
def test_accelerator_forms_fsdp2_and_parallelism_config() -> None:
    out = run_distributed(_accelerator_forms_fsdp2_and_meshes, 4, timeout=90)
    for rank, o in enumerate(out):
        assert o["fsdp2"] is None and o["fsdp_tp"] is None and o["pure_tp"] is None
        assert o["hsdp"] == o["hsdp_config_from_world"] == (rank // 2, 2)


# ---------------------------------------------------------------- the named forms (seed style)
@dataclasses.dataclass
class DDPConfig:
    find_unused_parameters: bool = False


@dataclasses.dataclass
class FSDP2Config:
    reshard_after_forward: bool = True


class MegatronFSDPConfig:
    pass


@pytest.mark.parametrize(
    "config, expected",
    [
        ("ddp", (1, 4)), ("DDP", (1, 4)), ("deepspeed_zero0", (1, 4)), ("deepspeed-zero1", (1, 4)),
        ("deepspeed_zero2", (1, 4)), (DDPConfig(), (1, 4)), ("hsdp", (1, 4)),
        ("fsdp", None), ("fsdp2", None), ("deepspeed_zero3", None), ("megatron_fsdp", None),
        ("tp", None), (FSDP2Config(), None), (MegatronFSDPConfig(), None),
    ],
)
def test_named_forms_seed_style(config, expected) -> None:
    assert dp_eval_sample_shard(config, 1, 4) == expected
    assert dp_eval_sample_shard(config, 0, 1) is None  # one rank: nothing to shard


def test_distributed_type_forms() -> None:
    from accelerate import DistributedType

    for replicated in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        assert dp_eval_sample_shard(replicated, 2, 3) == (2, 3)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        assert dp_eval_sample_shard(sharded, 2, 3) is None
    assert dp_eval_sample_shard(DistributedType.NO) is None
    for every in DistributedType:  # a new Accelerate value must not turn into a TypeError
        assert dp_eval_sample_shard(every, 0, 2) in ((0, 2), None)


@needs_parallelism_config
def test_parallelism_config_forms() -> None:
    from accelerate import ParallelismConfig

    hsdp = ParallelismConfig(dp_replicate_size=2, dp_shard_size=3)
    # dp_rank indexes the whole dp group; dp_replicate is the outer mesh dim
    assert [dp_eval_sample_shard(hsdp, r, 6) for r in range(6)] == [(0, 2)] * 3 + [(1, 2)] * 3
    assert dp_eval_sample_shard(ParallelismConfig(dp_shard_size=4), 1, 4) is None
    assert dp_eval_sample_shard(ParallelismConfig(dp_replicate_size=4), 3, 4) == (3, 4)
    hsdp_tp = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2, tp_size=2)
    assert dp_eval_sample_shard(hsdp_tp, 2, 4) == (1, 2)
    assert dp_eval_sample_shard(ParallelismConfig(tp_size=2), 0, 1) is None
    with pytest.raises(ValueError, match="dp_replicate_size x dp_shard_size"):
        dp_eval_sample_shard(hsdp, 0, 4)
    with pytest.raises(ValueError, match="describes 6 processes"):
        dp_eval_sample_shard(hsdp)  # no process group: one process


def test_named_forms_without_ranks_use_the_default_group() -> None:
    assert dp_eval_sample_shard("ddp") is None  # one process
    assert run_distributed(_ddp_without_ranks, 2) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="replicate rank"):
        dp_eval_sample_shard("hsdp")


def _ddp_without_ranks() -> tuple:
    return dp_eval_sample_shard("ddp")


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("ddp", 2, 2), ValueError, r"\[0, 2\)"),
        (("ddp", -1, 2), ValueError, r"\[0, 2\)"),
        (("ddp", 0, 0), ValueError, ">= 1"),
        (("ddp", 0, None), ValueError, "both"),
        (("ddp", 0.0, 2), TypeError, "int"),
        (("ddp", True, 2), TypeError, "int"),
        (("zero4", 0, 2), TypeError, "Accelerator"),
        ((object(), 0, 2), TypeError, "ParallelismConfig"),
        ((42, 0, 2), TypeError, "DDPConfig"),
        ((torch.nn.Module, 0, 2), TypeError, "torch.nn.Module"),
    ],
)
def test_bad_arguments(args, error, match) -> None:
    with pytest.raises(error, match=match):
        dp_eval_sample_shard(*args)


# ---------------------------------------------------------------- shard_samples / gather
def test_shard_samples_kinds() -> None:
    import datasets

    data = list(range(10))
    parts = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [shard_samples(data, (r, 4)) for r in range(4)] == parts
    assert shard_samples(tuple(data), (1, 3)) == (4, 5, 6)
    assert shard_samples(data, None) is data
    ds = datasets.Dataset.from_dict({"x": data})
    assert [shard_samples(ds, (r, 4))["x"] for r in range(4)] == parts
    assert shard_samples([1], (2, 3)) == []  # a rank may get nothing
    with pytest.raises(TypeError, match=r"list, tuple or datasets\.Dataset"):
        shard_samples(iter(data), (0, 2))
    with pytest.raises(TypeError, match="rank, size"):
        shard_samples(data, [0, 2])
    with pytest.raises(ValueError, match="0 <= rank < size"):
        shard_samples(data, (2, 2))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers()), st.integers(1, 9))
def test_merge_inverts_shard_samples(samples, size) -> None:
    parts = [shard_samples(samples, (r, size)) for r in range(size)]
    assert sum(map(len, parts)) == len(samples)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert _merge([(r, size, p) for r, p in enumerate(parts)], size) == samples


def _gather_property() -> int:
    # Every rank draws the same examples (derandomized), so each example is one collective call.
    rank, world = dist.get_rank(), dist.get_world_size()
    examples = []
    from accel_utils._side.lane import Lane

    with _counted(Lane, "gather") as calls:
        @settings(max_examples=25, deadline=None, derandomize=True, database=None)
        @given(st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=7))
        def check(samples):
            shard = (rank, world)
            mine = shard_samples(samples, shard)
            back = gather_sharded_results([("scored", s) for s in mine], shard)
            assert back == [("scored", s) for s in samples]
            examples.append(1)

        check()
    assert len(calls) == len(examples)  # one collective per gather
    return len(examples)


@pytest.mark.parametrize("world_size", [2, 4])
def test_gather_inverts_shard_on_a_real_group(world_size: int) -> None:
    out = run_distributed(_gather_property, world_size, timeout=90)
    assert out[0] >= 20 and len(set(out)) == 1


def _gather_edge_cases() -> dict:
    rank = dist.get_rank()
    out = {}
    # three samples over four ranks: rank 3 has none and must not hang or desync
    out["uneven"] = gather_sharded_results(shard_samples(["a", "b", "c"], (rank, 4)), (rank, 4))
    out["none"] = gather_sharded_results([rank], None)
    # two replicas of two ranks each: one copy per replica
    replica = (rank // 2, 2)
    out["replicas"] = gather_sharded_results(shard_samples(list(range(5)), replica), replica)
    out["world_group"] = gather_sharded_results([rank], (rank, 4), group=dist.group.WORLD)
    try:
        gather_sharded_results([rank], (min(rank, 1), 3))  # nobody holds shard 2
    except ValueError as exc:
        out["missing"] = str(exc)
    return out


def test_gather_edge_cases() -> None:
    out = run_distributed(_gather_edge_cases, 4)
    for rank, o in enumerate(out):
        assert o["uneven"] == ["a", "b", "c"]
        assert o["none"] == [rank]
        assert o["replicas"] == [0, 1, 2, 3, 4]
        assert o["world_group"] == [0, 1, 2, 3]
        assert "[2]" in o["missing"]  # every rank raises the same error instead of hanging


def test_shard_samples_dataset_gives_empty_parts() -> None:
    import datasets

    # fewer rows than ranks: the last ranks get an empty Dataset, as a list gives []
    one = datasets.Dataset.from_dict({"x": [7]})
    parts = [shard_samples(one, (r, 3)) for r in range(3)]
    assert [p["x"] for p in parts] == [[7], [], []]
    assert all(isinstance(p, datasets.Dataset) and p.column_names == ["x"] for p in parts)
    empty = datasets.Dataset.from_dict({"x": []})
    assert [len(shard_samples(empty, (r, 2))) for r in range(2)] == [0, 0]
    assert shard_samples([7], (2, 3)) == [] and shard_samples((), (1, 2)) == ()


def _gather_bad_layouts() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}

    def attempt(key, results, shard):
        try:
            out[key] = ("ok", gather_sharded_results(results, shard))
        except (TypeError, ValueError) as exc:
            out[key] = (type(exc).__name__, str(exc))

    # 5 samples over 4 ranks are parts of 2, 1, 1, 1: rank 0 returned one result too few and
    # rank 3 one too many (same total): joined, the results would be silently misaligned
    sizes = {0: 1, 1: 1, 2: 1, 3: 2}
    attempt("misaligned", [f"r{rank}"] * sizes[rank], (rank, world))
    # ranks of one replica (shard index) disagree on their results
    replica = (rank // 2, 2)
    attempt("replica_disagrees", [rank] * (2 if rank == 1 else 1), replica)
    # one rank passes None (every rank scores everything), the others a shard: no hang
    attempt("none_vs_tuple", [rank], None if rank == 0 else (rank - 1, world - 1))
    # an invalid shard on one rank only: every rank raises (it would leave the others waiting)
    attempt("invalid_on_one", [rank], (world, world) if rank == 2 else (rank, world))
    attempt("all_none", [rank], None)
    attempt("after", [rank], (rank, world))  # the group is still in step
    return out


def test_gather_checks_layout_and_validity_on_every_rank() -> None:
    out = run_distributed(_gather_bad_layouts, 4, timeout=60)
    for rank, o in enumerate(out):
        kind, text = o["misaligned"]
        assert kind == "ValueError" and "shard 0" in text and "expected 2" in text, text
        kind, text = o["replica_disagrees"]
        assert kind == "ValueError" and "replica" in text, text
        kind, text = o["none_vs_tuple"]
        assert kind == "ValueError" and "None" in text and "[0]" in text, text
        kind, text = o["invalid_on_one"]
        assert kind == "ValueError" and "rank 2" in text, text
        assert o["all_none"] == ("ok", [rank])
        assert o["after"] == ("ok", [0, 1, 2, 3])
    # the same error on every rank
    for key in ("misaligned", "replica_disagrees", "none_vs_tuple", "invalid_on_one"):
        assert len({o[key] for o in out}) == 1, key


def test_gather_without_a_group() -> None:
    assert gather_sharded_results(["x", "y"], (0, 1)) == ["x", "y"]
    assert gather_sharded_results([], None) == []
