"""How a DeviceMesh splits into the groups a Topology describes.

Part of the resolver: this is where Accelerate's and torch's mesh dimension names are known.

Groups are built from the mesh's own dimensions, through public API only: a single dimension
is ``mesh.get_group(dim)``; several dimensions (dp x cp for losses) become one group over the
ranks that share this rank's other coordinates, made with ``dist.new_group(ranks,
use_local_synchronization=True)``. Only that group's members take part in making it, so a mesh
over part of the world works, and neither the root-mesh slicing of flattened dimensions that
torch 2.13 deprecates nor the private ``DeviceMesh._flatten`` is needed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Dimension names. Data dims split the batch into different samples; cp splits each sequence,
# so losses and token counts are summed over data x cp (Accelerate's "dp_cp" dims, torchtitan's
# loss mesh) while eval samples are sharded over data dims only.
_REPLICATE_DIMS = ("dp_replicate", "replicate")
_SHARD_DIMS = ("dp_shard", "shard")
CP_DIMS = ("cp",)
NON_DP_DIMS = ("tp", "cp", "sp", "pp", "ep")
# Accelerate's flattened 1-D meshes mix data and cp ranks in one dimension: a loss group, but
# not one to shard eval samples over (ranks of one sequence would get different samples).
_FLAT_LOSS_DIMS = ("dp_cp", "dp_shard_cp")

# Groups made over several mesh dims, by their ranks: made once per set of ranks and world.
_made: dict[tuple[int, ...], dist.ProcessGroup] = {}
_making = threading.Lock()


class MeshGroups(NamedTuple):
    """The process groups of a mesh, by role (None: the mesh has no such dimension)."""

    whole: dist.ProcessGroup  # every rank of the mesh
    loss: dist.ProcessGroup | None  # data x cp: losses are summed over it (never tp)
    data: dist.ProcessGroup | None  # data dims only: ranks that see different samples
    replicate: dist.ProcessGroup | None
    shard: dist.ProcessGroup | None
    tp: dist.ProcessGroup | None
    cp: dist.ProcessGroup | None


def mesh_groups(mesh: DeviceMesh) -> MeshGroups:
    """The groups of ``mesh`` by dimension name; an unnamed 1-D mesh is data-parallel and an
    unnamed 2-D mesh follows torch's HSDP convention ``(replicate, shard)``.

    Raises:
        ValueError: an unnamed mesh of more than two dimensions, or this process is not one of
            the mesh's ranks.
    """
    if mesh.get_coordinate() is None:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not one of the DeviceMesh's ranks "
            f"{sorted(mesh.mesh.flatten().tolist())}; call it only on the mesh's ranks"
        )
    names = tuple(mesh.mesh_dim_names or _default_names(mesh.ndim))
    data = [i for i, n in enumerate(names) if n not in NON_DP_DIMS and n not in _FLAT_LOSS_DIMS]
    loss = [i for i, n in enumerate(names) if i in data or n in CP_DIMS or n in _FLAT_LOSS_DIMS]

    def dim(candidates: tuple[str, ...]) -> dist.ProcessGroup | None:
        return _group_over(mesh, [i for i, n in enumerate(names) if n in candidates])

    whole = _group_over(mesh, list(range(mesh.ndim)))
    assert whole is not None  # a mesh has at least one dimension
    return MeshGroups(whole, _group_over(mesh, loss), _group_over(mesh, data),
                      dim(_REPLICATE_DIMS), dim(_SHARD_DIMS), dim(("tp",)), dim(CP_DIMS))


def _default_names(ndim: int) -> tuple[str, ...]:
    if ndim == 1:
        return ("dp",)
    if ndim == 2:
        return ("replicate", "shard")
    raise ValueError("a DeviceMesh of more than 2 dimensions needs mesh_dim_names")


def _group_over(mesh: DeviceMesh, dims: list[int]) -> dist.ProcessGroup | None:
    """One group over ``dims`` of ``mesh`` holding this rank (None for no dims)."""
    if not dims:
        return None
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    coordinate = mesh.get_coordinate()
    assert coordinate is not None  # mesh_groups checked membership
    index = tuple(slice(None) if d in dims else coordinate[d] for d in range(mesh.ndim))
    ranks = tuple(int(r) for r in mesh.mesh[index].flatten().tolist())
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    with _making:  # threads resolving the same mesh at once: one new_group, not one each
        group = _made.get(ranks)
        if group is None:
            group = dist.new_group(list(ranks), use_local_synchronization=True)
            _made[ranks] = group
    return group


def forget_groups() -> None:
    """Forget the groups made here (a new default group, or it was destroyed)."""
    _made.clear()
