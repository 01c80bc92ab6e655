"""The side channel: bounded, diagnosed waits over a gloo group beside each parent group.

Private to accel-utils: the guards, barriers, probes and the doctor use what this package
exports, nobody imports its modules' insides. One module per concept:

* :mod:`.lane`: the state machine. Each parent group (and thread) has a lane whose numbered
  operations (one reduction each, over a tree) every member enters in the same order; its gloo
  group is created lazily, and parked and rebuilt after a failure.
* :mod:`.wire`: what travels: the operation word, the heartbeat mark, the failure record.
* :mod:`.heartbeat`: one thread per lane that beats while an operation lasts, reads alarms and
  makes every store call with a deadline.
* :mod:`.diagnosis`: failure records and marks -> the error every rank raises.
* :mod:`.gloo`: gloo group mechanics (lazy connections, descriptor checks, parking).
* :mod:`.timing`: every clock, derived in one place, and the timeout arguments.
* :mod:`.life`: this process's sign of life, from the first process group until its end.

A failure is published as a record in the job's store (first writer wins) *before* this rank
gives up on the group; a rank that sees a connection drop reads the records first and waits a
moment for one, so a peer's timeout is never mistaken for a death. Parked groups are kept alive
by a daemon thread, and destroyed only once their last operation completed successfully: a gloo
group's destructor waits for its pending operations, which would keep a failing rank from raising
or exiting. The package logs to
``accel_utils.side_channel``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from accel_utils._lazy import lazy_exports

if TYPE_CHECKING:
    from accel_utils._side.gloo import parked_count, set_timeout
    from accel_utils._side.lane import Lane
    from accel_utils._side.lanes import close, lane_count, lane_for, release_all, side_group
    from accel_utils._side.timing import DEFAULT_LIVENESS, as_liveness, as_timeout
    from accel_utils._side.wire import PAYLOAD_BITS, Failure, Kind, Order, Phase, Record, Reduced

# name -> module; loaded on first use, so that importing the sign-of-life thread's module at
# ``import accel_utils`` (standard library only) does not import torch
_EXPORTS = {
    **dict.fromkeys(("parked_count", "set_timeout"), "accel_utils._side.gloo"),
    "Lane": "accel_utils._side.lane",
    **dict.fromkeys(("close", "lane_count", "lane_for", "release_all", "side_group"),
                    "accel_utils._side.lanes"),
    **dict.fromkeys(("DEFAULT_LIVENESS", "as_liveness", "as_timeout"), "accel_utils._side.timing"),
    **dict.fromkeys(("PAYLOAD_BITS", "Failure", "Kind", "Order", "Phase", "Record", "Reduced"),
                    "accel_utils._side.wire"),
}

__all__ = [  # literal, for type checkers; tests/test_topology.py keeps it in step with _EXPORTS
    "DEFAULT_LIVENESS",
    "PAYLOAD_BITS",
    "Failure",
    "Kind",
    "Lane",
    "Order",
    "Phase",
    "Record",
    "Reduced",
    "as_liveness",
    "as_timeout",
    "close",
    "lane_count",
    "lane_for",
    "parked_count",
    "release_all",
    "set_timeout",
    "side_group",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
