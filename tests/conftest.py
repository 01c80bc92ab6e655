"""Suite-wide fixtures: one multi-process suite at a time on this machine, pools closed at exit."""

from __future__ import annotations

import fcntl
import os

import pytest

from tests import harness

# Two multi-process suites side by side on a 2-core machine time each other out: serialise them.
_LOCK_PATH = os.environ.get("ACCEL_UTILS_TEST_LOCK", "/tmp/accel_utils_tests.lock")


def pytest_sessionstart(session: pytest.Session) -> None:
    # held open (and locked) for the whole session, hence no with-block
    session.config._accel_utils_lock = open(_LOCK_PATH, "w")  # type: ignore[attr-defined]  # noqa: SIM115
    fcntl.flock(session.config._accel_utils_lock, fcntl.LOCK_EX)  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session) -> None:
    harness.close_pools()
    lock = getattr(session.config, "_accel_utils_lock", None)
    if lock is not None:
        lock.close()
