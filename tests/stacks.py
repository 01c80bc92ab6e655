"""What the installed Accelerate release can do, for tests of features an older one lacks.

``.ci/run`` runs the Accelerate / Transformers / Datasets-facing tests twice: with the newest
releases and with the floors in pyproject.toml. Every test asserts the same on both, except
where the floor release lacks the feature under test: that test skips with the reason below.
Versions come from the installed metadata, so nothing here imports accelerate.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import pytest
from packaging.version import Version


def accelerate_before(release: str) -> bool:
    """The installed Accelerate is older than ``release``."""
    return Version(version("accelerate")) < Version(release)


def _accelerate_at_least(release: str, feature: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        accelerate_before(release),
        reason=f"{feature} needs accelerate>={release}; {version('accelerate')} is installed",
    )


needs_parallelism_config = _accelerate_at_least("1.10", "accelerate.ParallelismConfig")
needs_fsdp2_plugin = _accelerate_at_least("1.6", "FullyShardedDataParallelPlugin(fsdp_version=2)")
# Accelerate 1.1's accumulate() enters the DeepSpeed engine's no_sync, which ZeRO-2/3 refuse; the
# DeepSpeed example and its tests are run with 1.16 (the only release they were tested on)
needs_deepspeed_accumulate = _accelerate_at_least(
    "1.16", "Accelerator.accumulate() on a ZeRO-2/3 engine (older releases call its no_sync)"
)
# transformers 4.57 and 5.x call Accelerator.unwrap_model(model, keep_torch_compile=False) in
# Trainer.evaluate / save_model; Accelerate 1.3 added the argument (their floor says 1.1 / 0.26)
needs_trainer_compatible_accelerate = _accelerate_at_least(
    "1.3", "transformers' Trainer (Accelerator.unwrap_model(keep_torch_compile=...))"
)


def fsdp1_plugin(sharding_strategy: str) -> Any:
    """An FSDP1 plugin on every release (``fsdp_version`` exists from Accelerate 1.6 only)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerate_before("1.6"):
        return FullyShardedDataParallelPlugin(sharding_strategy=sharding_strategy)
    return FullyShardedDataParallelPlugin(fsdp_version=1, sharding_strategy=sharding_strategy)


def sharded_fsdp_plugin() -> Any:
    """The FSDP2 plugin where the release has one (1.6+), else FSDP1 full sharding: either way
    a model sharded across the ranks, for tests of what the library does under sharding."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerate_before("1.6"):
        return fsdp1_plugin("FULL_SHARD")
    return FullyShardedDataParallelPlugin(fsdp_version=2)
