"""Ending a distributed job cleanly."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from accel_utils import _side
from accel_utils.topology import resolver

logger = logging.getLogger(__name__)


def destroy_process_group() -> None:
    """Barrier, then ``torch.distributed.destroy_process_group()``; a no-op without a group.

    Two-process gloo jobs (FSDP2 ones most of all) abort now and then at interpreter exit
    (``terminate called without an active exception``) when they end without tearing the group
    down, and about as often with a bare ``destroy_process_group()``: a peer may still be
    finishing its last collective, or a cached reference keeps a group alive into interpreter
    exit. This ends with a barrier, destroys the group and drops accel-utils' cached groups.
    Call it as the last distributed statement of a script, on every rank, after dropping
    wrappers that hold the group (a DDP model, a Trainer).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:  # never pass device_ids to a gloo barrier (it crashes hosts with fewer GPUs than ranks)
        dist.barrier()
    dist.destroy_process_group()
    # Our caches still hold the groups (side groups included). A group freed only at interpreter
    # exit can abort it: its gloo worker thread releases finished work that owns Python objects
    # after the interpreter stopped giving out the GIL. Freed here, its destructor joins them.
    resolver.forget_world()
    _side.release_all()
    logger.debug("process group destroyed")
