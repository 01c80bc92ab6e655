"""What the real-DeepSpeed tests share: the skip rule and the launch environment."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from tests.harness import launch_env


def require_deepspeed() -> None:
    """Skip without deepspeed (the ``deepspeed`` extra), except where
    ``ACCEL_UTILS_REQUIRE_DEEPSPEED=1`` (``.ci/run``): there a missing install fails."""
    if os.environ.get("ACCEL_UTILS_REQUIRE_DEEPSPEED") == "1":
        importlib.import_module("deepspeed")
    else:
        pytest.importorskip("deepspeed", reason="install the deepspeed extra")


def deepspeed_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a launched DeepSpeed job of one test."""
    # DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR, by default the shared
    # ~/.cache/torch_extensions, where a build killed half-way leaves a lock file that every
    # later build waits on forever: a directory of the test's own. (Every launch marks the one op
    # it would build on CPU, the shared-memory all-reduce, incompatible; see the worker.)
    return launch_env(HF_HOME=str(tmp_path / "hf"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
