"""accel-utils: Accelerate-compatible distributed utilities for PyTorch training.

Every public function accepts an ``accelerate.Accelerator``, an ``accelerate.PartialState``, a
``torch.distributed.ProcessGroup``, a ``DeviceMesh`` or nothing at all. Public names are loaded
on first use, so ``import accel_utils`` stays as light as ``import torch``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from accel_utils._lazy import lazy_exports

# The launcher's variables, read now: before any Accelerate object can write its own into
# os.environ (see accel_utils/topology/launcher.py). Standard library only.
from accel_utils.topology import launcher  # noqa: F401

# This process's sign of life for the other ranks (accel_utils/_side/life.py): a thread that
# waits for a default process group, then beats slowly. Standard library only.
from accel_utils._side import life  # isort: skip

life.start()

__version__ = "0.1.0"  # the one version string: pyproject.toml reads it from here

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these lazily
    from accel_utils.barriers import barrier, barrier_and_log
    from accel_utils.errors import (
        BarrierTimeoutError,
        FirstRankFailedError,
        RanksNotRespondingError,
        SideChannelError,
        StallError,
    )
    from accel_utils.eval_samples import gather_sharded_results, shard_samples
    from accel_utils.eval_shard import dp_eval_sample_shard
    from accel_utils.first_rank import FirstRankPerNode
    from accel_utils.grad_sync import get_sync_ctx
    from accel_utils.hang_watch import HangWatch
    from accel_utils.lifecycle import destroy_process_group
    from accel_utils.loss import reduce_loss
    from accel_utils.topology import Topology, resolve

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

# public name -> module that defines it
_EXPORTS = {
    "BarrierTimeoutError": "accel_utils.errors",
    "FirstRankFailedError": "accel_utils.errors",
    "FirstRankPerNode": "accel_utils.first_rank",
    "HangWatch": "accel_utils.hang_watch",
    "RanksNotRespondingError": "accel_utils.errors",
    "SideChannelError": "accel_utils.errors",
    "StallError": "accel_utils.errors",
    "Topology": "accel_utils.topology",
    "barrier": "accel_utils.barriers",
    "barrier_and_log": "accel_utils.barriers",
    "destroy_process_group": "accel_utils.lifecycle",
    "dp_eval_sample_shard": "accel_utils.eval_shard",
    "gather_sharded_results": "accel_utils.eval_samples",
    "shard_samples": "accel_utils.eval_samples",
    "get_sync_ctx": "accel_utils.grad_sync",
    "reduce_loss": "accel_utils.loss",
    "resolve": "accel_utils.topology",
}

__all__ = [
    "BarrierTimeoutError",
    "FirstRankFailedError",
    "FirstRankPerNode",
    "HangWatch",
    "RanksNotRespondingError",
    "SideChannelError",
    "StallError",
    "Topology",
    "__version__",
    "barrier",
    "barrier_and_log",
    "destroy_process_group",
    "dp_eval_sample_shard",
    "gather_sharded_results",
    "get_sync_ctx",
    "logger",
    "reduce_loss",
    "resolve",
    "shard_samples",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
