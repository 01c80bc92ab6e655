"""The multi-process test harness: real gloo process groups, hard timeouts, the ranks' output.

Two ways to run distributed code in tests:

* :func:`run_distributed` runs a picklable function on N processes, each in a fresh gloo group on
  a free loopback port, and returns every rank's result (or a :class:`RankFailure`). Processes are
  pooled per world size and reused between tests (importing torch costs about a second each);
  a pool whose worker died or hung is thrown away and rebuilt.
* :func:`run_torchrun` runs a script or module under ``torchrun``, optionally as several
  simulated nodes on 127.0.0.1 (one torchrun per node, ``--node_rank 0..N-1``).

Both enforce a hard timeout: a hang kills the processes and fails the test with their output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_CTX = mp.get_context("spawn")
DEFAULT_TIMEOUT = 60.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HarnessTimeout(AssertionError):
    """The distributed run did not finish in time; the message holds every rank's output."""


class RanksFailed(AssertionError):
    """At least one rank raised where the test expected all to succeed."""


@dataclasses.dataclass
class RankFailure:
    """What a rank raised (or how it died), in a form that always pickles."""

    rank: int
    exc_type: str
    message: str
    traceback: str = ""
    attrs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException) -> RankFailure:
        attrs = {}
        for key, value in vars(exc).items():
            if isinstance(value, (int, float, str, list, tuple, type(None))):
                attrs[key] = value
        return cls(rank, type(exc).__name__, str(exc), traceback.format_exc(), attrs)

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.exc_type}: {self.message}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(rank: int, world_size: int, port: int, nodes: int) -> dict[str, str]:
    per_node = world_size // nodes
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % per_node),
        "LOCAL_WORLD_SIZE": str(per_node),
        "GROUP_RANK": str(rank // per_node),
        "GROUP_WORLD_SIZE": str(nodes),
    }


def _teardown(ok: bool) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if ok:
            # ranks leave together: a destroyed peer would fail a slower rank's collective;
            # bounded, since after a fault test a peer may be dead
            with contextlib.suppress(Exception):
                dist.monitored_barrier(timeout=timedelta(seconds=10))
        dist.destroy_process_group()
    side = sys.modules.get("accel_utils._side")
    if side is not None:  # as accel_utils.destroy_process_group does
        side.release_all()
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None:
        accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
        accelerate_state.GradientState._reset_state()


def _worker_main(rank: int, world_size: int, tasks: Any, results: Any, log_path: str) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    base_env = dict(os.environ)
    while True:
        task = tasks.get()
        if task is None:
            return
        fn, args, kwargs, port, nodes, extra_env, timeout = task
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(_worker_env(rank, world_size, port, nodes))
        for key, value in extra_env.items():  # None unsets a variable (a bare launcher)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # each task is a fresh launch: accel_utils reads the launcher's variables again, as a
        # fresh process would at import (this worker imported it before the variables were set)
        from accel_utils.topology import launcher

        launcher.take_snapshot()
        ok = False
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
            outcome: Any = fn(*args, **kwargs)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
            outcome = RankFailure.from_exception(rank, exc)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        # A worker whose side channel gave up on a group (parked it) retires after this task:
        # parked groups and their threads must not leak into the next test's process.
        side = sys.modules.get("accel_utils._side")
        retire = side is not None and side.parked_count() > 0
        try:  # before the teardown: after a fault test it may wait on a dead peer for a while
            results.put((rank, outcome, retire))
        except Exception as exc:  # noqa: BLE001 - an unpicklable result is the test's bug: say so
            results.put((rank, RankFailure.from_exception(rank, exc), retire))
        _teardown(ok)


class WorkerPool:
    """``world_size`` long-lived worker processes that run one distributed task at a time."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.logdir = tempfile.mkdtemp(prefix=f"accel_utils_pool{world_size}_")
        self.results = _CTX.Queue()
        self.tasks = [_CTX.Queue() for _ in range(world_size)]
        self.logs = [os.path.join(self.logdir, f"rank{r}.log") for r in range(world_size)]
        self.procs = [
            _CTX.Process(
                target=_worker_main,
                args=(r, world_size, self.tasks[r], self.results, self.logs[r]),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.broken = False

    def _log_sizes(self) -> list[int]:
        return [os.path.getsize(p) if os.path.exists(p) else 0 for p in self.logs]

    def output(self, since: list[int] | None = None, limit: int = 4000) -> str:
        """Every rank's output since the given offsets (the tail, at most ``limit`` chars)."""
        parts = []
        for rank, path in enumerate(self.logs):
            start = since[rank] if since else 0
            try:
                with open(path, errors="replace") as fh:
                    fh.seek(start)
                    text = fh.read()
            except FileNotFoundError:
                text = ""
            parts.append(f"----- rank {rank} -----\n{text[-limit:]}")
        return "\n".join(parts)

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        nodes: int = 1,
        env: dict[str, str | None] | None = None,
    ) -> list[Any]:
        if self.world_size % nodes:
            raise ValueError(f"{self.world_size} ranks cannot be split over {nodes} nodes")
        since = self._log_sizes()
        port = free_port()
        for queue in self.tasks:
            queue.put((fn, args, kwargs or {}, port, nodes, dict(env or {}), timeout))
        outcomes: dict[int, Any] = {}
        deadline = time.monotonic() + timeout + 10  # the group's own timeout fires first
        while len(outcomes) < self.world_size:
            try:
                rank, outcome, retire = self.results.get(timeout=0.2)
                self.broken = self.broken or retire
                outcomes[rank] = outcome
                continue
            except Exception:  # noqa: BLE001 - queue.Empty, or a dead worker: checked below
                pass
            for rank, proc in enumerate(self.procs):
                if rank not in outcomes and not proc.is_alive():
                    self.broken = True
                    outcomes[rank] = RankFailure(rank, "died", f"exit code {proc.exitcode}")
            if time.monotonic() > deadline:
                self.broken = True
                self.kill()
                missing = sorted(set(range(self.world_size)) - set(outcomes))
                raise HarnessTimeout(
                    f"ranks {missing} did not finish within {timeout}s\n{self.output(since)}"
                )
        self.last_output = self.output(since)
        return [outcomes[r] for r in range(self.world_size)]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)

    def close(self) -> None:
        if not self.broken:
            for queue in self.tasks:
                queue.put(None)
            for proc in self.procs:
                proc.join(timeout=5)
        self.kill()


_pools: dict[int, WorkerPool] = {}


def _pool(world_size: int) -> WorkerPool:
    pool = _pools.get(world_size)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close()
        pool = _pools[world_size] = WorkerPool(world_size)
    return pool


def close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT,
    nodes: int = 1,
    env: dict[str, str | None] | None = None,
    expect_ok: bool = True,
    fresh: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks of a fresh gloo group.

    Args:
        fn: a module-level (picklable) function; it runs after ``init_process_group``.
        world_size: number of ranks.
        timeout: hard limit in seconds, also the process group's own timeout.
        nodes: simulate this many nodes through the launcher variables (``GROUP_RANK``,
            ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), ranks numbered node by node as torchrun does.
        env: extra environment variables for this run; a value of None unsets the variable.
        expect_ok: raise :class:`RanksFailed` with every rank's output if any rank failed.
        fresh: run in newly started processes, not pooled ones that earlier tests used (for a
            test that counts process-wide resources: an earlier test's lanes, threads and
            connections end whenever their threads exit or the garbage collector runs).

    Returns:
        Each rank's return value, or a :class:`RankFailure` for ranks that raised or died.
    """
    if fresh and world_size in _pools:
        _pools.pop(world_size).close()
    pool = _pool(world_size)
    outcomes = pool.run(fn, args, kwargs, timeout=timeout, nodes=nodes, env=env)
    failures = [o for o in outcomes if isinstance(o, RankFailure)]
    if expect_ok and failures:
        details = "\n".join(f"{f}\n{f.traceback}" for f in failures)
        raise RanksFailed(f"{len(failures)} rank(s) failed:\n{details}\n{pool.last_output}")
    return outcomes


@dataclasses.dataclass
class NodeRun:
    """One torchrun (one simulated node): its exit code and output."""

    node_rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for launched jobs: this checkout importable, one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant: torchrun starts its workers in
    sessions of their own, which a killed torchrun leaves behind holding the output pipes."""
    victims = _descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def run_commands(
    commands: list[list[str]],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> list[NodeRun]:
    """Start several commands side by side (own sessions) and wait for all, killing on timeout."""
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else launch_env(),
            cwd=cwd or REPO_ROOT,
            start_new_session=True,
        )
        for cmd in commands
    ]
    deadline = time.monotonic() + timeout
    runs: list[NodeRun] = []
    timed_out = False
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:
                _kill_tree(p.pid)
            out, err = proc.communicate()
        runs.append(NodeRun(i, proc.returncode, out, err))
    if timed_out:
        text = "\n".join(f"----- node {r.node_rank} -----\n{r.output[-6000:]}" for r in runs)
        raise HarnessTimeout(f"{commands} did not finish within {timeout}s\n{text}")
    return runs


def run_torchrun(
    target: list[str],
    *,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    node_args: list[list[str]] | None = None,
) -> list[NodeRun]:
    """Run ``target`` (``["script.py", ...]`` or ``["-m", "module", ...]``) under torchrun.

    With ``nnodes > 1`` one torchrun per simulated node runs side by side on 127.0.0.1, as
    ``--nnodes N --node_rank i``; workers then see ``GROUP_RANK`` 0..N-1 on the same host.
    ``node_args[i]``, if given, is appended to ``target`` on node ``i`` only.
    """
    port = free_port()
    commands = [
        [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--node_rank={node}", f"--nproc_per_node={nproc_per_node}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--max_restarts=0",
            *target, *(node_args[node] if node_args else []),
        ]
        for node in range(nnodes)
    ]
    return run_commands(commands, timeout=timeout, env=env, cwd=cwd)
