"""How a multi-dimensional DeviceMesh splits into the groups a Topology describes.

Part of the resolver (only :mod:`accel_utils.topology` imports it), split out to keep that
module small: this is where Accelerate's and torch's mesh dimension names are known.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch.distributed as dist

# Mesh dimension names, Accelerate's first (its flattened "dp_cp" / "dp" meshes), then torch's.
_LOSS_DIMS = ("dp_cp", "dp")
_REPLICATE_DIMS = ("dp_replicate", "replicate")
_SHARD_DIMS = ("dp_shard_cp", "dp_shard", "shard")
NON_DP_DIMS = ("tp", "cp", "sp", "pp", "ep")


class MeshGroups(NamedTuple):
    """The process groups of a mesh of two or more dimensions (None: no such dimension)."""

    whole: dist.ProcessGroup  # every rank of the mesh
    loss: dist.ProcessGroup  # the data-parallel ranks losses are averaged over (never tp)
    replicate: dist.ProcessGroup | None
    shard: dist.ProcessGroup | None
    tp: dist.ProcessGroup | None


def mesh_groups(mesh: Any) -> MeshGroups:
    """The groups of ``mesh`` (``ndim >= 2``), by dimension name; unnamed 2-D meshes follow
    torch's HSDP convention ``(replicate, shard)``.

    Raises:
        ValueError: an unnamed mesh of more than two dimensions.
    """
    names = tuple(mesh.mesh_dim_names or ())
    whole = _flatten(mesh)
    if not names:
        if mesh.ndim != 2:
            raise ValueError("a DeviceMesh of more than 2 dimensions needs mesh_dim_names")
        return MeshGroups(whole, whole, mesh.get_group(0), mesh.get_group(1), None)
    loss = _dim_group(mesh, _LOSS_DIMS)
    if loss is None:
        dp_names = tuple(n for n in names if n not in NON_DP_DIMS)
        loss = _flatten(mesh[dp_names]) if dp_names else whole
    return MeshGroups(whole, loss, _dim_group(mesh, _REPLICATE_DIMS),
                      _dim_group(mesh, _SHARD_DIMS), _dim_group(mesh, ("tp",)))


def _dim_group(mesh: Any, candidates: tuple[str, ...]) -> dist.ProcessGroup | None:
    for name in candidates:
        try:  # flattened dims (Accelerate's "dp_cp") are reachable by name from the root mesh
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return mesh[name].get_group()
        except (KeyError, RuntimeError, ValueError):
            continue
    return None


def _flatten(mesh: Any) -> dist.ProcessGroup:
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()  # private, but the only way to one group over a sub-mesh
