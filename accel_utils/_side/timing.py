"""Every clock of the side channel, derived from a few base values in one place.

The heartbeat beats every ``POLL_S`` while an operation (or a wake) is young, then slower; a
waiting rank judges the others at the same pace. How long a member must be silent before it
counts as not beating, how long a failure path waits for the store or for a peer's record: all
follow from the beat, so changing one base value keeps the others consistent.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from numbers import Real
from typing import Any

logger = logging.getLogger("accel_utils.side_channel")

POLL_S = 0.5  # how often a wait beats and judges while it is young (or woken)
FAST_S = 10 * POLL_S  # how long an operation (or a wake) keeps the beat at POLL_S
SLOW_BEAT_S = 6 * POLL_S  # the slowest beat of a long wait
BEAT_AFTER_S = POLL_S / 5  # operations shorter than this (every quick one) never beat
GRACE_S = POLL_S  # our deadline trails gloo's timeout, so that gloo ends the operation itself
SETTLE_S = POLL_S + 0.3  # on a failure: one beat and a store round trip for every mark to land
LOST_WAIT_S = 2 * POLL_S  # after a lost connection: how long a peer's record may take to appear
STORE_MIN_S = 10.0  # a busy store host may stall a request for seconds: not a lost store
STORE_S = 30.0  # how long a failure path waits for the store when liveness is off

LIFE_BEAT_S = SLOW_BEAT_S  # a process's sign of life (see life.py): one store write this often

DEFAULT_LIVENESS = 30.0  # seconds without a heartbeat before a member is named unresponsive
MAX_TIMEOUT = timedelta(days=30)  # longer ones overflow gloo's clock arithmetic: clamped


def beat_interval(lasted: float, liveness: float | None) -> float:
    """Seconds between beats of an operation ``lasted`` seconds old.

    ``POLL_S`` for the first ``FAST_S``, then six beats per liveness window, between ``POLL_S``
    and ``SLOW_BEAT_S``: the store load of a long wait stays small whatever the world size.
    """
    if lasted < FAST_S:
        return POLL_S
    return min(max(POLL_S, (liveness or SLOW_BEAT_S * 6) / 6), SLOW_BEAT_S)


def silence_s(liveness: float | None) -> float:
    """Silence that proves a member is not beating: its slowest beat and the thread's lag."""
    return beat_interval(FAST_S, liveness) + 2 * POLL_S


def unresponsive_window(liveness: float) -> float:
    """Once one member is silent for ``liveness``: name every member silent this long."""
    return max(liveness / 2, 3 * POLL_S)


def absent_silence_s(liveness: float) -> float:
    """How long a member that never entered an operation must show no sign of life to be named:
    the liveness window, but never less than two of its slow beats and the readers' lag."""
    return max(liveness, 2 * LIFE_BEAT_S + 2 * POLL_S)


def store_deadline(liveness: float | None) -> float:
    """How long a store request may take before the job's store counts as lost."""
    return STORE_S if liveness is None else max(liveness, STORE_MIN_S)


def as_timeout(value: Any, name: str = "timeout") -> timedelta:
    """A positive ``timedelta`` (at most 30 days) from a ``timedelta`` or seconds."""
    if isinstance(value, bool) or not isinstance(value, (timedelta, Real)):
        raise TypeError(f"{name} must be a datetime.timedelta or seconds; got {value!r}")
    if not isinstance(value, timedelta) and not math.isfinite(value):  # nan: timedelta() fails
        raise ValueError(f"{name} must be a finite number of seconds; got {value!r}")
    if isinstance(value, timedelta):
        limit = value
    else:
        limit = timedelta(seconds=min(float(value), MAX_TIMEOUT.total_seconds()))
    if limit.total_seconds() <= 0:
        raise ValueError(f"{name} must be positive; got {limit}")
    if limit > MAX_TIMEOUT:
        logger.debug("%s %s clamped to %s", name, limit, MAX_TIMEOUT)
    return min(limit, MAX_TIMEOUT)


def as_liveness(value: Any) -> float | None:
    """Seconds of heartbeat silence that name a member unresponsive; None turns it off."""
    return None if value is None else as_timeout(value, "liveness").total_seconds()
