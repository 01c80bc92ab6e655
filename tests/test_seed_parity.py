"""Seed parity: NeMo Automodel's ``components.distributed.utils`` API, name by name.

Every public name and keyword of the seed exists in accel_utils with the seed's parameter names
in the seed's order; the "Moving from NeMo Automodel" page (docs/moving-from-nemo.md) lists each
of them; and the one-line changes it gives do what it says, on real gloo processes.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.harness import REPO_ROOT, run_distributed

# The seed's API page (/work/shared/spec/seed-api.md), transcribed: name -> (where accel-utils
# keeps it, the seed's parameters in order, the seed's defaults). None: data, not a callable.
SEED: dict[str, tuple[str, list[str] | None, dict[str, object]]] = {
    "FirstRankPerNode": ("accel_utils", [], {}),
    "FirstRankPerNode.__enter__": ("accel_utils", ["timeout"], {"timeout": timedelta(hours=10)}),
    "FirstRankPerNode.__exit__": ("accel_utils", ["exc_type", "exc_val", "exc_tb"], {}),
    "_barrier_with_timeout": ("accel_utils.barriers", ["timeout", "group"], {"group": None}),
    "_create_gloo_group": ("accel_utils.barriers", [], {}),
    "barrier_and_log": ("accel_utils", ["string"], {}),
    "dp_eval_sample_shard": ("accel_utils", ["distributed_config", "dp_rank", "dp_size"], {}),
    "get_sync_ctx": ("accel_utils", ["model", "is_optim_step", "defer_fsdp_grad_sync"], {}),
    "reduce_loss": (
        "accel_utils",
        ["loss_store", "total_num_tokens", "per_token_loss", "dp_group"],
        {"per_token_loss": True, "dp_group": None},
    ),
    "logger": ("accel_utils", None, {}),
}

SEED_API_PAGE = os.environ.get("ACCEL_UTILS_SEED_API", "/work/shared/spec/seed-api.md")


def _lookup(name: str):
    module, _, _ = SEED[name]
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(SEED))
def test_every_seed_name_and_keyword_exists(name: str) -> None:
    obj = _lookup(name)
    _, params, defaults = SEED[name]
    if params is None:
        assert obj.__class__.__name__ == "Logger"
        return
    signature = inspect.signature(obj)
    ours = [p for p in signature.parameters.values() if p.name != "self"]
    # the seed's parameters first, in its order, callable by position and by keyword
    assert [p.name for p in ours[: len(params)]] == params, signature
    for p in ours[: len(params)]:
        assert p.kind is p.POSITIONAL_OR_KEYWORD, (name, p)
    for p in ours[len(params):]:  # anything added has a default: seed calls still bind
        assert p.default is not p.empty or p.kind is p.VAR_KEYWORD, (name, p)
    for key, seed_default in defaults.items():
        ours_default = signature.parameters[key].default
        if name == "FirstRankPerNode.__enter__":  # None: the constructor's timeout, seed's value
            assert ours_default is None
            assert importlib.import_module("accel_utils").FirstRankPerNode().timeout == seed_default
        else:
            assert ours_default == seed_default, (name, key)


def test_the_list_matches_the_seed_api_page() -> None:
    if not os.path.exists(SEED_API_PAGE):
        pytest.skip(f"the seed's API page is not here ({SEED_API_PAGE})")
    with open(SEED_API_PAGE) as fh:
        text = fh.read()
    prefix = "nemo_automodel.components.distributed.utils."
    found: dict[str, list[str]] = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        head = block.strip().removeprefix("class ")
        if not head.startswith(prefix):
            continue
        match = re.match(re.escape(prefix) + r"([\w.]+)(?:\((.*)\))?", head, re.S)
        assert match, head
        name, args = match.group(1), match.group(2)
        if match.group(2) is None:  # data (logger = ...)
            found[name.split(" ")[0]] = []
            continue
        found[name] = [a.split(":")[0].split("=")[0].strip()
                       for a in re.split(r",\s*(?![^\[]*\])", args) if a.strip()]
    assert set(found) == set(SEED)
    for name, params in found.items():
        assert (SEED[name][1] or []) == params, name


def _moving_section() -> str:
    with open(os.path.join(REPO_ROOT, "docs", "moving-from-nemo.md")) as fh:
        return fh.read()


def test_moving_page_lists_every_seed_name_and_keyword() -> None:
    section = _moving_section()
    for name, (_, params, _) in SEED.items():
        short = name.split(".")[-1]
        assert f"{short}(" in section or f"`{short}`" in section, name
        for param in params or []:
            assert re.search(rf"\b{param}\b", section), (name, param)
    # the documented way to the seed's behaviour where it differs on purpose
    for one_line in ("FirstRankPerNode(local=False)", "FirstRankPerNode(timeout=",
                     "use_local_synchronization=True",
                     "denominator.reshape(total_num_tokens.shape).int()",
                     'dist.new_group(backend="gloo")'):
        assert one_line in section, one_line


def _seed_calls() -> dict:
    from accel_utils import (
        FirstRankPerNode,
        barrier_and_log,
        dp_eval_sample_shard,
        get_sync_ctx,
        reduce_loss,
    )
    from accel_utils.barriers import _barrier_with_timeout, _create_gloo_group

    rank = dist.get_rank()
    out: dict = {}
    with FirstRankPerNode() as out["per_node_first"]:  # 2 simulated nodes, 1 rank each
        pass
    with FirstRankPerNode(local=False) as out["global_first"]:
        pass
    guard = FirstRankPerNode()
    out["enter_timeout"] = guard.__enter__(timeout=timedelta(seconds=30))
    out["exit"] = guard.__exit__(None, None, None)
    out["ctor_timeout"] = FirstRankPerNode(timeout=timedelta(hours=2)).timeout

    losses, tokens = [torch.tensor(1.0 + rank), torch.tensor(2.0)], torch.tensor([3])
    loss, denominator = reduce_loss(losses, tokens, True, None)  # the seed's positional call
    out["reduced"] = (loss.tolist(), denominator.tolist(), str(denominator.dtype))
    solo = dist.new_group([rank], use_local_synchronization=True)
    loss, denominator = reduce_loss(losses, tokens, dp_group=solo)
    seed_shape = denominator.reshape(tokens.shape).int()
    out["solo"] = (loss.tolist(), denominator.tolist(), str(seed_shape.dtype),
                   tuple(seed_shape.shape), (loss / denominator).item(), loss[0].item())
    scalar_tokens = torch.tensor(3)
    _, denominator = reduce_loss(losses, scalar_tokens, dp_group=solo)
    out["scalar_tokens"] = tuple(denominator.reshape(scalar_tokens.shape).int().shape)

    out["barrier"] = _barrier_with_timeout(timedelta(seconds=30))
    side = _create_gloo_group()
    out["side_is_cached"] = side is _create_gloo_group()
    try:
        dist.monitored_barrier(group=side, timeout=timedelta(seconds=30))
        out["monitored_on_side"] = "ok"
    except ValueError:
        out["monitored_on_side"] = "ValueError"
    try:
        dist.destroy_process_group(side)
        out["destroy_side"] = "ok"
    except ValueError:
        out["destroy_side"] = "ValueError"
    fresh = dist.new_group(backend="gloo")  # the seed's group, registered
    dist.monitored_barrier(group=fresh, timeout=timedelta(seconds=30))
    dist.destroy_process_group(fresh)
    barrier_and_log("seed parity")

    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    with get_sync_ctx(model, False, True):
        out["ddp_sync_inside"] = model.require_backward_grad_sync
    out["ddp_sync_after"] = model.require_backward_grad_sync
    out["shard"] = (dp_eval_sample_shard("ddp", rank, 2), dp_eval_sample_shard("fsdp2", rank, 2))
    return out


def test_seed_calls_and_the_one_line_changes_on_two_nodes() -> None:
    out = run_distributed(_seed_calls, 2, nodes=2, timeout=60)
    for rank, o in enumerate(out):
        assert o["per_node_first"] is True  # each node's local rank 0
        assert o["global_first"] is (rank == 0)  # the seed's order: rank 0 alone
        assert o["enter_timeout"] is True and o["exit"] is False
        assert o["ctor_timeout"] == timedelta(hours=2)
        assert o["reduced"] == ([(1.0 + 2.0) + (2.0 + 2.0)], [6], "torch.int64")  # None: world
        assert o["solo"] == ([3.0 + rank], [3], "torch.int32", (1,),
                             pytest.approx((3.0 + rank) / 3), 3.0 + rank)
        assert o["scalar_tokens"] == ()  # the seed's denominator shape for a 0-d token count
        assert o["barrier"] is True and o["side_is_cached"] is True
        assert o["monitored_on_side"] == "ValueError" and o["destroy_side"] == "ValueError"
        assert o["ddp_sync_inside"] is False and o["ddp_sync_after"] is True
        assert o["shard"] == ((rank, 2), None)
