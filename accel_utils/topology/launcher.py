"""The launcher's variables as the launcher set them: a snapshot taken at ``import accel_utils``.

Accelerate writes launcher variables of its own: ``Accelerator(cpu=True)`` /
``PartialState(cpu=True)`` under a launch without torchrun (only ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) sets ``LOCAL_RANK=0`` and ``LOCAL_WORLD_SIZE=1`` in
``os.environ`` on every rank. Whatever reads them after an Accelerate object exists sees values
that no launcher set. So accel-utils reads them once, when the package is imported (scripts
import it before they build an Accelerator), and :mod:`accel_utils.topology` and the doctor read
this snapshot, never ``os.environ``. Standard library only: importing it costs nothing.
"""

from __future__ import annotations

import os
import sys

# Launcher variables (torchrun, accelerate launch, mpirun / srun recipes) that identify a
# process's place in the job; the doctor shows these.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_snapshot: dict[str, str] = {}
_accelerate_first: list[bool] = [False]  # an Accelerate state existed when the snapshot was taken


def take_snapshot() -> None:
    """Read the variables from ``os.environ`` now (done once at ``import accel_utils``).

    Only for a process that is reused for another launch with a new environment (a test
    harness's pooled workers); a job's processes never call it.
    """
    _snapshot.clear()
    for name in LAUNCHER_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            _snapshot[name] = value
    # imported after an Accelerator / PartialState was built: LOCAL_* may be Accelerate's
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "PartialState", None), "_shared_state", None)
    _accelerate_first[0] = bool(shared)


def accelerate_came_first() -> bool:
    """An Accelerate state existed when the snapshot was taken, so ``LOCAL_RANK`` /
    ``LOCAL_WORLD_SIZE`` in it may be Accelerate's own (they must be checked, not trusted)."""
    return _accelerate_first[0]


def snapshot() -> dict[str, str]:
    """The launcher variables that were set at import."""
    return dict(_snapshot)


def get(name: str) -> str | None:
    """One variable as it was at import (None if it was unset then)."""
    return _snapshot.get(name)


def get_int(name: str) -> int | None:
    """One variable as an int, as it was at import (None if unset or not an integer)."""
    value = _snapshot.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def changed_since_import() -> dict[str, tuple[str | None, str | None]]:
    """The launcher variables whose value in ``os.environ`` differs from the snapshot, as
    ``{name: (at import, now)}`` (for example what Accelerate wrote)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for name in LAUNCHER_VARIABLES:
        then, now = _snapshot.get(name), os.environ.get(name)
        if then != now:
            out[name] = (then, now)
    return out


take_snapshot()
