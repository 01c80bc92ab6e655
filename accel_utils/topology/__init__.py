"""Where am I: the one place that knows the parallel layout of a process and its groups.

Every feature asks :func:`resolve` for a frozen :class:`Topology` (like torchtitan's
``ParallelDims``) instead of deriving ranks, nodes or groups itself. The modules here are the
only readers of launcher variables, Accelerate state and DeviceMesh internals:

* :mod:`~accel_utils.topology.resolver`: :class:`Topology` and :func:`resolve`;
* :mod:`~accel_utils.topology.launcher`: the launcher's variables, read at ``import accel_utils``
  (before an Accelerate object can write its own);
* :mod:`~accel_utils.topology.nodes`: node identity (launcher claims, host keys, the verdict);
* :mod:`~accel_utils.topology.mesh`: a DeviceMesh's groups by dimension name;
* :mod:`~accel_utils.topology.accelerate`: what an Accelerate object says.

``import accel_utils`` imports the launcher snapshot (standard library only) and so this
package: its names load on first use, so that it does not import torch.distributed then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from accel_utils._lazy import lazy_exports

if TYPE_CHECKING:
    from accel_utils.topology.nodes import NodeLayout
    from accel_utils.topology.resolver import (
        Topology,
        launcher_env,
        node_layout,
        resolve,
        single_process,
    )

_EXPORTS = {
    "NodeLayout": "accel_utils.topology.nodes",
    "Topology": "accel_utils.topology.resolver",
    "launcher_env": "accel_utils.topology.resolver",
    "node_layout": "accel_utils.topology.resolver",
    "resolve": "accel_utils.topology.resolver",
    "single_process": "accel_utils.topology.resolver",
}

__all__ = ["NodeLayout", "Topology", "launcher_env", "node_layout", "resolve", "single_process"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
