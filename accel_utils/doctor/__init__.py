"""``python -m accel_utils.doctor``: what every rank of a launch thinks it is, in one table.

Launch it exactly like the job (``torchrun ... -m accel_utils.doctor --path /data/cache``,
``accelerate launch ... -m accel_utils.doctor``, or as one plain process). Every rank resolves its
own topology with :func:`accel_utils.topology.resolve` and sends it over the library's gloo side
channel; every rank then reaches the same verdicts (:mod:`accel_utils.doctor.report`) and rank 0
prints them. Exit code 0 when nothing is a problem, 1 when something is (or a rank failed or did
not answer in time), 2 on bad arguments.

The doctor computes nothing of its own: ranks, nodes and devices come from ``topology``, the side
channel from ``barriers``, the shared-directory verdict from ``shared_dir.path_is_shared`` (the
routine behind ``FirstRankPerNode(local="auto")``). Only the command-line part at the end prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from accel_utils import topology
from accel_utils._side import DEFAULT_LIVENESS, lane_for, side_group
from accel_utils.barriers import barrier
from accel_utils.doctor.report import TRIES, Report, Row, checks, render
from accel_utils.doctor.watch import Watch, first_line
from accel_utils.lifecycle import destroy_process_group
from accel_utils.shared_dir import path_is_shared

# ----------------------------------------------------------------------------- this rank's facts


def _path_facts(path: str | None) -> Row | None:
    if path is None:
        return None
    if not os.path.isdir(path):
        return {"writable": False, "free_bytes": None, "error": "is not an existing directory"}
    try:  # the way a cache writer finds out: create a file
        with tempfile.NamedTemporaryFile(dir=path, prefix=".accel_utils_doctor_"):
            pass
        error = None
    except OSError as exc:
        error = f"not writable ({exc.strerror or exc})"
    return {"writable": error is None, "free_bytes": shutil.disk_usage(path).free, "error": error}


@contextmanager
def _environ_kept() -> Iterator[None]:
    """Undo whatever the block writes into ``os.environ`` (Accelerate writes launcher variables:
    the doctor's other checks must see the launch, not what its own Accelerate check wrote)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in [n for n in os.environ if n not in before]:
            del os.environ[name]
        for name, value in before.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def _accelerate_facts(mode: str) -> Row:
    if mode == "off":
        return {"skip": "--accelerate off"}
    try:
        from accelerate import PartialState
    except ImportError:
        return {"skip": "accelerate is not installed"}
    cpu = mode == "cpu" or (mode == "auto" and not torch.cuda.is_available())
    call = f"PartialState(cpu={cpu})"
    try:
        with _environ_kept():
            state = PartialState(cpu=cpu)
    except Exception as exc:  # noqa: BLE001 - the doctor reports what Accelerate raised
        return {"call": call, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "call": call,
        "type": str(state.distributed_type).rsplit(".", 1)[-1],
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "local_process_index": state.local_process_index,
    }


def _gpu(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    # the UUID tells physical GPUs apart whatever CUDA_VISIBLE_DEVICES each rank was given
    return f"{props.name} {props.uuid}"


def _row(topo: topology.Topology, args: argparse.Namespace) -> Row:
    nodes = topo.nodes
    return {
        "rank": topo.rank,
        "world_size": topo.world_size,
        "node": nodes.node_rank,
        "num_nodes": nodes.num_nodes,
        "local_rank": nodes.local_rank,
        "local_world_size": nodes.local_world_size,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(topo.device),
        "gpu": _gpu(topo.device),
        "backend": topo.backend,
        "accelerate": _accelerate_facts(args.accelerate),
        "launcher": topology.launcher_env(),
        "path": _path_facts(args.path),
    }


# ----------------------------------------------------------------------------- running


def _init_group(timeout: timedelta) -> None:
    env = topology.launcher_env()  # as the launcher set them (read at import)
    if "WORLD_SIZE" not in env:  # one plain process
        return
    backend = "gloo"
    if torch.cuda.is_available():  # what a job does: NCCL, one GPU per local rank
        backend = "nccl"
        local_rank = int(env.get("LOCAL_RANK", "0"))
        if local_rank < torch.cuda.device_count():  # else the CUDA check reports the shared GPU
            torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timeout)


def _all_gather(obj: Any, topo: topology.Topology, timeout: timedelta) -> list[Any]:
    """``obj`` (JSON-able) from every rank, in rank order (a side-channel gather)."""
    assert topo.group is not None  # the doctor gathers only from a launch of several ranks
    lane = lane_for(topo.group)
    parts = lane.gather(lane.begin(), "doctor", json.dumps(obj).encode(), timeout,
                        DEFAULT_LIVENESS)
    return [json.loads(part) for part in parts]


def _time_side_channel(side: Any, timeout: timedelta) -> dict[str, float]:
    samples: dict[str, list[float]] = {"barrier": [], "all_reduce": []}
    tensor = torch.zeros(1)
    for _ in range(TRIES):
        start = time.perf_counter()
        barrier(timeout=timeout)  # raises naming the ranks that did not arrive, or died
        samples["barrier"].append((time.perf_counter() - start) * 1e3)
    for _ in range(TRIES):
        start = time.perf_counter()
        side.allreduce(tensor, timeout=timeout).wait()
        samples["all_reduce"].append((time.perf_counter() - start) * 1e3)
    return {op: statistics.median(ms) for op, ms in samples.items()}


def _collect(report: Report, row: Row, topo: topology.Topology, args: argparse.Namespace,
             timeout: timedelta, watch: Watch) -> None:
    watch.enter("creating the gloo side group")
    assert topo.group is not None  # the doctor collects only from a launch of several ranks
    side = side_group(topo.group, timeout)
    watch.enter("gathering the rows")
    report.rows = _all_gather(row, topo, timeout)
    shared = None
    num_nodes = len({r["node"] for r in report.rows})  # every rank decides from the same rows
    if args.path is not None and num_nodes > 1 and all(r["path"]["writable"] for r in report.rows):
        watch.enter("testing whether --path is shared between nodes")
        shared = path_is_shared(args.path, timeout=timeout)
    watch.enter("timing the side channel")
    mine = _time_side_channel(side, timeout)
    watch.enter("gathering the timings")
    timings = _all_gather(mine, topo, timeout)
    report.checks = checks(report.rows, args.path, shared, timings)


def run(args: argparse.Namespace, emit: Callable[[Report], None]) -> Report:
    """Join the launch (if any), check it, and hand the report (the same on every rank) to emit.

    A failure of any rank ends this process with exit code 1 after emitting the report.
    """
    timeout = timedelta(seconds=args.timeout)
    try:
        _init_group(timeout)
    except Exception as exc:  # noqa: BLE001 - any rendezvous failure becomes the report
        report = Report(failures=[f"no process group within {args.timeout:g}s: {first_line(exc)} "
                                  "-> check that every rank was launched and that MASTER_ADDR:"
                                  "MASTER_PORT is reachable from every node"])
        emit(report)
        return report
    topo = topology.resolve()
    report = Report(rank=topo.rank)
    row = _row(topo, args)  # before the watch starts: importing accelerate may take seconds
    if topo.world_size == 1:
        report.rows = [row]
        report.checks = checks(report.rows, args.path, None, None)
        emit(report)
        return report

    def report_failures(failures: list[str]) -> None:
        report.failures = failures
        emit(report)

    watch = Watch(topo, timeout, report_failures)
    try:
        _collect(report, row, topo, args, timeout, watch)
    except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
        watch.fail(f"failed while {watch.stage}: {first_line(exc)}")
    watch.finish()
    emit(report)
    return report


# ----------------------------------------------------------------------------- command line


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel-utils-doctor",
        description="Launch it like your job (torchrun / accelerate launch / one process): every "
        "rank's topology in one table, then checks of the launcher's variables, Accelerate's "
        "state, a cache directory, the gloo side channel and the CUDA devices. Exit code 0: all "
        "good; 1: a problem (or a rank failed); 2: bad arguments.",
    )
    parser.add_argument("--path", help="a cache directory: writable everywhere? shared by nodes?")
    parser.add_argument("--timeout", type=_positive_seconds, default=60.0,
                        help="seconds any step may wait for the other ranks (default 60)")
    parser.add_argument("--json", metavar="FILE", help="also write the report to FILE (rank 0)")
    parser.add_argument("--accelerate", choices=("auto", "cpu", "default", "off"), default="auto",
                        help="the Accelerate state to check: auto = PartialState(cpu=True) where "
                        "there is no CUDA, else PartialState() (what a correct script does); cpu; "
                        "default = PartialState(), as a script that never passes cpu=True; off")
    return parser


def _emit(report: Report, json_path: str | None) -> None:
    if report.rank == 0:
        sys.stdout.write(render(report) + "\n")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(report.to_json(), fh, indent=2)
    elif report.failures:
        sys.stderr.write(report.failures[0] + "\n")
    sys.stdout.flush()
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """The command line: parse, check, print on rank 0; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its directory does not exist")
    report = run(args, lambda rep: _emit(rep, args.json))
    destroy_process_group()  # barrier, then teardown (a no-op for one process)
    return report.exit_code
