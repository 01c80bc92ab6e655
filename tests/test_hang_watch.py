"""HangWatch on real gloo groups: 4 processes as 2 simulated nodes x 2.

Each test stalls a training loop one way (a straggler, a desync, a frozen rank, a killed rank)
and reads what the reporters (rank 0, and node 1's local rank 0, rank 2) logged; healthy but
slow or uneven loops must log nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

from accel_utils import HangWatch, StallError
from accel_utils.hang_report import RankReport, Silent, stall_table
from tests.harness import RankFailure, _pools, run_distributed

with open(__file__) as _file:
    _SOURCE = _file.read().splitlines()


def _line(marker: str) -> str:
    """``test_hang_watch.py:N``: the line of this file that carries ``marker``."""
    number = next(i for i, text in enumerate(_SOURCE, 1) if marker in text and "_line(" not in text)
    return f"test_hang_watch.py:{number}"


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _training(scenario: str, stall: float, on_stall: str = "report", steps: int = 4) -> dict:
    """A loop of ``steps`` steps (data, then an all-reduce) that ``scenario`` stalls at step 3."""
    rank = dist.get_rank()
    pids: list = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    pair = dist.new_group([0, 1])
    captured = _Captured()
    logging.getLogger("accel_utils.hang_watch").addHandler(captured)
    logging.basicConfig(level=logging.INFO)  # this worker's stderr: the test reads it on exit
    watch = HangWatch(stall=stall, liveness=4, on_stall=on_stall)
    if scenario == "stop" and rank == 0:  # resume the frozen rank once a report is out
        def resume() -> None:
            deadline = time.monotonic() + 40
            while not watch.last_report and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(pids[3], signal.SIGCONT)

        threading.Thread(target=resume, daemon=True).start()
    out: dict = {}
    try:
        with watch:
            for step in range(1, steps + 1):
                watch.step("data")
                if step == 3 and rank == 2 and scenario == "straggler":
                    time.sleep(stall + 6)  # the straggler's line
                if step == 3 and rank == 2 and scenario == "spin":
                    end = time.monotonic() + stall + 30
                    while time.monotonic() < end:  # the spinning line
                        pass
                if step == 3 and rank == 3 and scenario == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                if step == 3 and rank == 3 and scenario == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                watch.phase("sync")
                if step == 3 and rank == 1 and scenario == "desync":
                    dist.barrier(group=pair)  # the desynced collective
                else:
                    dist.all_reduce(torch.ones(1))  # the step's all-reduce
    except StallError as exc:
        out.update(error="StallError", message=str(exc), ranks=exc.ranks)
    except RuntimeError as exc:  # a collective with a dead peer
        out.update(error=type(exc).__name__, message=str(exc))
    finally:
        logging.getLogger("accel_utils.hang_watch").removeHandler(captured)
    out.update(reports=watch.reports, log="\n".join(captured.lines))
    return out


def _run(scenario: str, stall: float = 2.0, on_stall: str = "report", timeout: float = 60,
         **kw: object) -> list:
    return run_distributed(_training, 4, scenario, stall, on_stall, nodes=2, timeout=timeout,
                           expect_ok=False, **kw)


def test_a_straggler_is_named_with_its_node_step_phase_and_line() -> None:
    out = _run("straggler")
    for reporter in (0, 2):  # rank 0, and node 1's local rank 0 (the straggler itself)
        log = out[reporter]["log"]
        assert "look at rank 2" in log, log
        line = next(x for x in log.splitlines() if x.strip().startswith("rank 2 "))
        assert "step 3" in line and "data" in line and "node 1" in line, log
        assert _line("# the straggler's line") in line and "straggler" in line, log
        assert "3 ranks" in log and _line("# the step's all-reduce") in log, log
    assert all(o["reports"] >= 1 for o in out)  # every rank saw the stall, and it passed
    assert all("error" not in o for o in out), out


def test_a_desync_is_named_with_both_call_sites_and_exit_ends_every_rank() -> None:
    out = _run("desync", on_stall="exit")
    assert all(isinstance(o, RankFailure) and o.message == "exit code 1" for o in out), out
    log = _pools[4].last_output
    line = next(x for x in log.splitlines() if x.strip().startswith("rank 1 "))
    assert "desync" in line and _line("# the desynced collective") in line, log
    assert _line("# the step's all-reduce") in log and "3 ranks" in log, log
    assert log.count("HangWatch ends rank") == 4, log


def test_a_frozen_rank_is_named_not_responding() -> None:
    out = _run("stop")
    log = out[0]["log"]
    line = next(x for x in log.splitlines() if x.strip().startswith("rank 3 "))
    assert "not responding" in line and "node 1" in line, log
    assert "died" not in log, log
    assert all("error" not in o for o in out), out  # resumed, the loop finished


def test_a_killed_rank_is_named_dead() -> None:
    out = _run("kill", on_stall="exit")
    assert isinstance(out[3], RankFailure) and out[3].message == "exit code -9", out
    said = _pools[4].last_output
    rank0 = said.split("----- rank 1 -----")[0]
    line = next(x for x in rank0.splitlines() if x.strip().startswith("rank 3 "))
    assert "died (its process is gone)" in line and "node 1" in line, said
    # a neighbour whose all-reduce failed ("connection reset", no rank) is told who died
    assert "rank 3 (node 1) died (its process is gone)" in said.split("----- rank 2 -----")[1]


def test_raise_ends_every_rank_within_its_bound() -> None:
    started = time.monotonic()
    out = _run("spin", on_stall="raise", timeout=60)
    took = time.monotonic() - started
    assert out[2]["error"] == "StallError" and 2 in out[2]["ranks"], out[2]
    assert _line("# the spinning line") in out[2]["message"], out[2]
    for rank in (0, 1, 3):  # inside the all-reduce: raised once it returns, else ended
        assert (out[rank].message == "exit code 1" if isinstance(out[rank], RankFailure)
                else out[rank]["error"] == "StallError"), out
    assert took < 32, took  # the spin lasts stall + 30 s: every rank ended before it did


def _healthy(first_step_s: float, uneven_s: float, stall: float) -> dict:
    rank = dist.get_rank()
    with HangWatch(stall=stall, liveness=4) as watch:
        for step in range(1, 9):
            watch.step()
            time.sleep(first_step_s if step == 1 else 0.0)  # compile / warm-up
            if rank == 1:  # uneven but moving; one step longer than `stall`
                time.sleep(3 * uneven_s if step == 5 else uneven_s)
            dist.all_reduce(torch.ones(1))
        requests = watch._lane.pulse.requests  # store round trips of the watch's connection
    return {"reports": watch.reports, "requests": requests}


def test_slow_first_steps_and_uneven_ranks_are_not_stalls() -> None:
    out = run_distributed(_healthy, 4, 1.5, 0.25, 1.0, nodes=2, timeout=60)
    assert [o["reports"] for o in out] == [0, 0, 0, 0], out
    # while training goes well: no store request beyond the lane's creation (its one mark)
    assert [o["requests"] for o in out] == [1, 1, 1, 1], out


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"on_stall=.halt.\): expected one of"):
        HangWatch(on_stall="halt")
    for name in ("stall", "liveness", "warmup"):
        with pytest.raises(ValueError, match=name):
            HangWatch(**{name: -1})


def _report(rank: int, step: int, spot: str, inner: str = "distributed_c10d.py:1 in all_reduce",
            phase: str = "sync") -> RankReport:
    return RankReport(rank, rank // 2, "h", step, phase, 61.0, (inner, spot), spot)


def test_the_table_tells_stragglers_desyncs_frozen_and_dead_ranks_apart() -> None:
    from accel_utils._side.life import Life

    reports = {r: _report(r, 12, "train.py:40 in main") for r in (0, 1, 4)}
    reports[2] = _report(2, 11, "data.py:8 in load", inner="data.py:8 in load", phase="data")
    reports[3] = _report(3, 12, "train.py:44 in main", inner="distributed_c10d.py:9 in barrier")
    reports[5] = _report(5, 12, "data.py:8 in load", inner="data.py:8 in load")
    silent = [Silent(6, Life(1, 1, "h", 3, 12, "sync"), "not responding", 31),
              Silent(7, Life(1, 1, "h", 3, 12, "sync"), "died"), Silent(8, None, "never", 9)]
    text, odd = stall_table(reports, silent, 60)
    rows = {int(x.split()[1]): x for x in text.splitlines() if x.strip().startswith("rank ")}
    assert "3 ranks" in text and "ranks 0, 1, 4" in text and odd == [2, 3, 5, 6, 7, 8]
    assert "behind by 1 step" in rows[2] and "desync" in rows[3] and "straggler" in rows[5]
    assert "not responding for 31 s" in rows[6] and "node 3" in rows[6]
    assert "died" in rows[7] and "no sign of life" in rows[8]
    assert text.startswith("HangWatch: no progress for 61 s (limit 60 s) at step 12; look at")


def test_one_process_reports_its_own_line() -> None:
    captured = _Captured()
    logging.getLogger("accel_utils.hang_watch").addHandler(captured)
    try:
        with HangWatch(stall=0.4, warmup=0.4) as watch:
            watch.step("data")
            time.sleep(1.2)  # the lone sleeper
    finally:
        logging.getLogger("accel_utils.hang_watch").removeHandler(captured)
    assert watch.reports >= 1 and _line("# the lone sleeper") in captured.lines[0], captured.lines
