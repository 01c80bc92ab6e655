"""Which rank failed, and why: the doctor's progress in the job's own store.

gloo's "Connection closed by peer" names an address, not a rank, and a rank that dies cannot
say so. So every rank of ``python -m accel_utils.doctor`` records the step it is in and its
exception if it raises. When anything fails, rank 0 reads the other ranks' signs of life (the
library's one heartbeat, :mod:`accel_utils._side.life`) for a moment: a process gone from its
host is dead, a sign that stands still marks a dead or frozen process.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

# TCPStore is public torch.distributed API, but torch 2.13 does not re-export it to type checkers
from torch.distributed import TCPStore  # type: ignore[attr-defined]
from torch.distributed.distributed_c10d import PrefixStore, Store

from accel_utils import topology
from accel_utils._side import life
from accel_utils._side.timing import LIFE_BEAT_S

_TICK_S = 0.2  # how often each rank checks its step's time and rank 0 the alarm
_SURVEY_S = 2 * LIFE_BEAT_S + 1.0  # how long rank 0 reads a silent rank's sign of life


def _own_store(topo: topology.Topology, timeout: timedelta) -> tuple[Store, Store]:
    """A connection of our own to the job's store, under a key prefix new for this run (and
    the same connection without the prefix, where the signs of life are).

    A store connection serves one request at a time, and the main thread may sit in a blocking
    store wait for minutes (a gloo group being built waits there for its peers): the heartbeat
    must not queue behind it, so it gets a second connection to the same TCPStore.
    """
    if topo.group is None:
        raise RuntimeError("the doctor's watch needs an initialised process group")
    shared = topo.group.get_group_store()
    if topo.rank == 0:  # the job's store may outlive this run (torchrun restarts): a fresh prefix
        shared.set("accel_utils/doctor/run", secrets.token_hex(8))
    prefix = f"accel_utils/doctor/{shared.get('accel_utils/doctor/run').decode()}"
    tcp = shared
    while hasattr(tcp, "underlying_store"):  # PrefixStores down to the TCPStore
        tcp = tcp.underlying_store
    if not isinstance(tcp, TCPStore):  # a FileStore or HashStore: share the connection
        return PrefixStore(prefix, shared), tcp
    own = TCPStore(tcp.host, tcp.port, is_master=False, timeout=timeout)
    return PrefixStore(prefix, own), own


class Watch:
    """One rank's progress in the job's store, so that rank 0 can say which rank failed and why.

    Its heartbeat thread also ends any step that outlives the timeout (every rank), and on rank 0
    it answers another rank's alarm at once instead of waiting out rank 0's own collective.

    Args:
        topo: this rank's topology (its group's store is used).
        timeout: how long any one step may take.
        report: called once with the failure lines, just before the process ends with code 1.
    """

    def __init__(self, topo: topology.Topology, timeout: timedelta,
                 report: Callable[[list[str]], None]) -> None:
        self._store, self._root = _own_store(topo, timeout)
        self._rank, self._size, self._report = topo.rank, topo.world_size, report
        assert topo.group is not None  # _own_store checked it
        self._globals = dist.get_process_group_ranks(topo.group)
        self._limit = timeout.total_seconds() + 1.0  # gloo's own timeout, with its message, first
        self._lock = threading.Lock()
        self._done = False
        self.enter("starting")
        where = f"node {topo.nodes.node_rank}, {socket.gethostname()}"
        self._store.set(f"where/{self._rank}", where)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="doctor-watch", daemon=True)
        self._thread.start()

    def enter(self, stage: str) -> None:
        """This rank starts ``stage`` (a phrase: "while <stage>" reads right)."""
        self.stage, self._since = stage, time.monotonic()
        self._store.set(f"stage/{self._rank}", stage)

    def _watch(self) -> None:
        while not self._stop.wait(_TICK_S):
            try:
                alarm = self._rank == 0 and self._store.check(["alarm"])
            except Exception:  # noqa: BLE001 - the store is gone: the main thread reports it
                return
            if time.monotonic() - self._since > self._limit:
                self.fail(f"waited {self._limit - 1:g}s while {self.stage}")
            elif alarm:
                self.fail(f"was waiting while {self.stage}")

    def finish(self) -> None:
        """The checks completed: stop watching (unless a failure report has already begun)."""
        with self._lock:
            lost, self._done = self._done, True
        if not lost:
            self._stop.set()
        self._thread.join()  # after a lost race the watch thread ends the process itself

    def fail(self, why: str) -> None:
        """Report this rank's failure (rank 0: with the others') and end the process with 1.

        The record tells rank 0 that this rank is alive and why it stops (its heartbeat stops
        too when this runs on the watch thread).
        """
        with self._lock:
            if self._done:
                return
            self._done = True
        mine = f"rank {self._rank} {why}"
        try:
            self._store.set(f"error/{self._rank}", why)
            self._store.add("alarm", 1)
            if self._rank == 0:
                self._report([*self._survey(), mine])
                self._store.set("reported", "1")
            else:
                self._report([mine])
                # torchrun stops a node's other workers when one exits: let rank 0 finish first
                self._store.wait(["reported"], timedelta(seconds=_SURVEY_S + 10))
        except Exception:  # noqa: BLE001 - best effort on the way out: exits below regardless
            pass
        os._exit(1)

    def _get(self, key: str) -> str | None:
        return self._store.get(key).decode() if self._store.check([key]) else None

    def _survey(self) -> list[str]:
        others = [r for r in range(self._size) if r != self._rank]
        first = self._lives(others)
        since = time.monotonic()
        while True:  # until every silent rank is dead, has moved, or _SURVEY_S passed
            errors = {r: self._get(f"error/{r}") for r in others}
            now = self._lives(others)
            gone = [r for r in others if r in now and now[r].gone_from_this_host()]
            still = [r for r in others if errors[r] is None and r not in gone
                     and (r not in now or now[r].count == getattr(first.get(r), "count", None))]
            waited = time.monotonic() - since
            if not still or waited >= _SURVEY_S:
                break
            time.sleep(_TICK_S)
        died, stopped = [], []
        for r in others:
            who = f"rank {r} ({self._get(f'where/{r}') or 'never started'})"
            stage = self._get(f"stage/{r}") or "starting"
            if errors[r] is not None:
                stopped.append(f"{who} {errors[r]}")
            elif r in gone:
                died.append(f"{who} died while {stage} (its process is gone)")
            elif r in still:
                died.append(f"{who} died or froze while {stage} (no sign of life for "
                            f"{waited:.1f}s)")
        return died + stopped

    def _lives(self, ranks: list[int]) -> dict[int, life.Life]:
        found = life.read(self._root, [self._globals[r] for r in ranks])
        return {r: found[self._globals[r]] for r in ranks if self._globals[r] in found}


def first_line(exc: BaseException) -> str:
    """``Type: message`` on one short line (gloo's messages run to several sentences)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"
