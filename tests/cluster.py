"""A multi-host test bed from Linux network namespaces (root only), and a launcher on it.

``Cluster(nodes=2)`` builds, under unique (pid-based) names:

* a hub namespace holding a bridge ``br0``;
* one namespace per node, with ``eth0`` (a veth whose peer ``vn<i>`` sits on the hub's bridge)
  at 10.213.0.(10+i)/24, and loopback up. Addresses exist only inside these namespaces.

Each node runs its processes under ``ip netns exec NS unshare --uts --mount --fork sh -c ...``:
its own host name (``node<i>``) and its own tmpfs on :attr:`Cluster.local_dir` (the same path on
every node, a different disk on each: node-local storage). :attr:`Cluster.shared_dir` is one
plain directory that every node sees (a shared filesystem).

``partition(i)`` detaches node i's veth from the bridge (frames dropped silently both ways, no
RST); ``heal(i)`` attaches it again. Teardown (also on failure) kills every process group it
started, deletes the namespaces and removes the directories.

Without root, ``ip`` or ``unshare`` the fixture skips, unless ``ACCEL_UTILS_REQUIRE_NETNS=1``,
in which case it fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from tests.harness import launch_env

SUBNET = "10.213.0"
NODE_IF = "eth0"
MASTER_PORT = 29500  # each bed is its own network: no port clash with anything else


class BedUnavailable(RuntimeError):
    """This machine cannot build the bed (not root, or a tool missing)."""


def bed_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    return None


def _sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise BedUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclasses.dataclass
class ProcResult:
    """One launched process: its rank, node, exit code (None: killed by the hard timeout)."""

    rank: int
    node: int
    returncode: int | None
    output: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]

    def results(self) -> list[dict]:
        """The JSON payloads of this process's ``RESULT {...}`` lines."""
        return [json.loads(line[len("RESULT "):]) for line in self.lines("RESULT ")]


class Job:
    """Processes started by :meth:`Cluster.launch`: one ``sh`` per node, outputs in files."""

    def __init__(self, cluster: Cluster, placement: list[int], rundir: str,
                 popens: list[subprocess.Popen], timeout: float) -> None:
        self.cluster = cluster
        self.placement = placement  # placement[rank] = the node that rank runs on
        self.rundir = rundir
        self.popens = popens
        self.deadline = time.monotonic() + timeout
        self.timed_out = False

    @property
    def world_size(self) -> int:
        return len(self.placement)

    def output(self, rank: int) -> str:
        try:
            with open(os.path.join(self.rundir, f"out{rank}"), errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def returncode(self, rank: int) -> int | None:
        try:
            with open(os.path.join(self.rundir, f"rc{rank}")) as fh:
                return int(fh.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def wait_for(self, rank: int, text: str, timeout: float = 60.0) -> bool:
        """Wait until ``text`` appears in a rank's output (False after ``timeout``)."""
        end = min(time.monotonic() + timeout, self.deadline)
        while time.monotonic() < end:
            if text in self.output(rank):
                return True
            if self.returncode(rank) is not None:
                return text in self.output(rank)
            time.sleep(0.1)
        return False

    def finished(self, rank: int) -> bool:
        return self.returncode(rank) is not None

    def wait(self, ranks: list[int] | None = None) -> list[ProcResult]:
        """Wait for ``ranks`` (all by default) until the hard deadline; kill everything then.

        Every process still running when the wanted ranks finished or at the deadline is
        killed: the job is over after this call. Killed processes have ``returncode`` None.
        """
        wanted = range(self.world_size) if ranks is None else ranks
        while time.monotonic() < self.deadline:
            if all(self.finished(r) for r in wanted):
                break
            time.sleep(0.2)
        else:
            self.timed_out = True
        if ranks is None or not self.timed_out:
            # grace for the ranks we do not wait for to write their outcome (never required)
            end = min(time.monotonic() + 2.0, self.deadline)
            while time.monotonic() < end and not all(
                    self.finished(r) for r in range(self.world_size)):
                time.sleep(0.2)
        self.kill()
        return self.results()

    def results(self) -> list[ProcResult]:
        return [ProcResult(r, node, self.returncode(r), self.output(r))
                for r, node in enumerate(self.placement)]

    def kill(self) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
        for popen in self.popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)

    def describe(self) -> str:
        parts = []
        for res in self.results():
            parts.append(f"----- rank {res.rank} (node {res.node}) rc={res.returncode} -----\n"
                         f"{res.output[-3000:]}")
        return "\n".join(parts)


class Cluster:
    """``nodes`` simulated hosts on network namespaces; use as a context manager."""

    def __init__(self, nodes: int = 2) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError("1 <= nodes <= 200")
        self.nodes = nodes
        self.tag = f"au{os.getpid()}"
        self.hub = f"{self.tag}hub"
        self.node_ns = [f"{self.tag}n{i}" for i in range(nodes)]
        self.addrs = [f"{SUBNET}.{10 + i}" for i in range(nodes)]
        self.base = ""
        self.shared_dir = ""
        self.local_dir = ""
        self._made_ns: list[str] = []
        self._jobs: list[Job] = []
        self._runs = 0

    # -- set-up and teardown ------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        reason = bed_unavailable_reason()
        if reason:
            raise BedUnavailable(reason)
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self._made_ns.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        # `ip netns exec` binds /etc/netns/NS/hosts over /etc/hosts: the nodes know each other
        etc = os.path.join("/etc/netns", name)
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "hosts"), "w") as fh:
            fh.write("127.0.0.1 localhost\n")
            fh.writelines(f"{addr} node{i}\n" for i, addr in enumerate(self.addrs))

    def _up(self) -> None:
        self.base = tempfile.mkdtemp(prefix=f"accel_utils_bed{os.getpid()}_")
        self.shared_dir = os.path.join(self.base, "shared")
        self.local_dir = os.path.join(self.base, "local")  # a tmpfs per node is mounted here
        os.makedirs(self.shared_dir)
        os.makedirs(self.local_dir)
        self._add_ns(self.hub)
        _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.node_ns):
            self._add_ns(ns)
            _sh("ip", "-n", self.hub, "link", "add", self.hub_veth(i), "type", "veth",
                "peer", "name", NODE_IF, "netns", ns)
            _sh("ip", "-n", self.hub, "link", "set", self.hub_veth(i), "master", "br0")
            _sh("ip", "-n", self.hub, "link", "set", self.hub_veth(i), "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", NODE_IF)
            _sh("ip", "-n", ns, "link", "set", NODE_IF, "up")

    def close(self) -> None:
        for job in self._jobs:
            job.kill()
        self._jobs.clear()
        for ns in reversed(self._made_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(os.path.join("/etc/netns", ns), ignore_errors=True)
        self._made_ns.clear()
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = ""

    # -- faults -------------------------------------------------------------------------------
    def hub_veth(self, i: int) -> str:
        return f"vn{i}"

    def partition(self, i: int) -> None:
        """Cut node ``i`` off: its veth leaves the bridge; frames are dropped both ways."""
        _sh("ip", "-n", self.hub, "link", "set", self.hub_veth(i), "nomaster")

    def heal(self, i: int) -> None:
        _sh("ip", "-n", self.hub, "link", "set", self.hub_veth(i), "master", "br0")

    # -- launching ----------------------------------------------------------------------------
    def launch(self, script: str, args: list[str] | None = None, *, procs_per_node: int = 2,
               timeout: float = 120.0, launcher_vars: bool = True, node_rank: bool = False,
               placement: list[int] | None = None, hostnames: list[str] | None = None,
               env: dict[str, str] | None = None) -> Job:
        """Start ``python script args`` for every rank, torchrun-like variables set.

        Ranks are numbered node by node, ``procs_per_node`` on each, unless ``placement`` says
        which node each rank runs on (``[0, 0, 0, 1]``: 3 + 1; ``[0, 1, 0, 1]``: round robin).
        ``launcher_vars=False`` sets only RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a bare
        launcher, as mpirun / srun recipes: node identity must come from the ranks themselves);
        ``launcher_vars=True`` adds LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK and
        GROUP_WORLD_SIZE as torchrun sets them. ``node_rank=True`` exports NODE_RANK (the node's
        index) on every rank, as many SLURM and mpirun recipes do. ``hostnames[i]`` is node i's
        host name (default ``node<i>``; two nodes may share one). Each process also gets
        GLOO_SOCKET_IFNAME, BED_LOCAL_DIR and BED_SHARED_DIR. The job is killed at ``timeout``
        by :meth:`Job.wait` (a hard timeout), and at teardown anyway.
        """
        if placement is None:
            placement = [node for node in range(self.nodes) for _ in range(procs_per_node)]
        if not placement or any(not 0 <= node < self.nodes for node in placement):
            raise ValueError(f"placement {placement}: nodes are 0..{self.nodes - 1}")
        hostnames = hostnames or [f"node{i}" for i in range(self.nodes)]
        if len(hostnames) != self.nodes:
            raise ValueError(f"{len(hostnames)} host names for {self.nodes} nodes")
        self._runs += 1
        rundir = os.path.join(self.shared_dir, f".run{self._runs}")
        os.makedirs(rundir)
        world = len(placement)
        base_env = launch_env(**(env or {}))
        base_env.update(GLOO_SOCKET_IFNAME=NODE_IF, BED_LOCAL_DIR=self.local_dir,
                        BED_SHARED_DIR=self.shared_dir)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "GROUP_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
            base_env.pop(key, None)
        popens = []
        try:
            for node in range(self.nodes):
                ranks = [r for r, where in enumerate(placement) if where == node]
                starts = []
                for local, rank in enumerate(ranks):
                    vars_ = {"RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": self.addrs[0],
                             "MASTER_PORT": MASTER_PORT}
                    if launcher_vars:
                        vars_.update(LOCAL_RANK=local, LOCAL_WORLD_SIZE=len(ranks),
                                     GROUP_RANK=node, GROUP_WORLD_SIZE=self.nodes)
                    if node_rank:
                        vars_.update(NODE_RANK=node)
                    cmd = ["env", *(f"{k}={v}" for k, v in vars_.items()), sys.executable,
                           script, *(args or [])]
                    out = shlex.quote(os.path.join(rundir, f"out{rank}"))
                    rc = shlex.quote(os.path.join(rundir, f"rc{rank}"))
                    starts.append(f"( {shlex.join(cmd)} >{out} 2>&1; echo $? >{rc} ) &")
                if not starts:
                    continue
                inner = (f"hostname {shlex.quote(hostnames[node])} && mount -t tmpfs tmpfs "
                         f"{shlex.quote(self.local_dir)} && {{ {' '.join(starts)} wait; }}")
                popens.append(subprocess.Popen(
                    ["ip", "netns", "exec", self.node_ns[node], "unshare", "--uts", "--mount",
                     "--fork", "sh", "-c", inner],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=base_env, cwd=self.shared_dir, start_new_session=True))
        except BaseException:
            for popen in popens:
                os.killpg(popen.pid, signal.SIGKILL)
            raise
        job = Job(self, list(placement), rundir, popens, timeout)
        self._jobs.append(job)
        return job

    def run(self, script: str, args: list[str] | None = None, **kwargs: object) -> list[ProcResult]:
        """:meth:`launch` and wait for every process (killed at the hard timeout)."""
        return self.launch(script, args, **kwargs).wait()  # type: ignore[arg-type]


@contextlib.contextmanager
def bed_for_tests(nodes: int = 2) -> Iterator[Cluster]:
    """A bed for a pytest fixture: skipped where it cannot be built, failed if it must run."""
    import pytest  # only the fixtures need it

    reason = bed_unavailable_reason()
    required = os.environ.get("ACCEL_UTILS_REQUIRE_NETNS") == "1"
    if reason:
        if required:
            pytest.fail(f"ACCEL_UTILS_REQUIRE_NETNS=1 but the namespace bed {reason}")
        pytest.skip(f"namespace test bed {reason}")
    try:
        bed = Cluster(nodes=nodes).__enter__()
    except BedUnavailable as exc:
        if required:
            pytest.fail(f"ACCEL_UTILS_REQUIRE_NETNS=1 but the bed cannot be built: {exc}")
        pytest.skip(f"namespace test bed cannot be built: {exc}")
    try:
        yield bed
    finally:
        bed.close()
