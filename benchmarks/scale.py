"""The side channel at many ranks, simulated on one machine: critical paths, sockets, store load.

    python benchmarks/scale.py --baseline d39320b   # 8, 32, 128, 256 ranks, and the ring (~15 min)
    python benchmarks/scale.py --world-sizes 8 --wait 3 --out /tmp/scale   # smoke run

Each simulated node is one process holding ``--ranks-per-node`` ranks as threads; every rank has
its own store client (its process's side connection), its own side-channel lane (the library's
``Lane`` and ``Pulse``) and its own gloo side group, all against one TCPStore served by this
process, as under torchrun. Per world size it counts (from the algorithm, not the clock):

* the critical path of an empty operation in sequential message hops (the tree: ``2 log2``;
  gloo's ring all-reduce, the baseline: ``2 (world - 1)``) and the messages a rank sends per
  operation (mean and most);
* the critical path of the side group's creation in hops (each hop's first message also looks up
  its peer's address in the store) and the store requests a rank makes to create it;

and measures:

* the creation (the lane and its group, every rank from a common start) and the descriptors each
  rank holds afterwards (``/proc/self/fd`` of the node, divided by its ranks);
* the latency of an empty side-channel operation (what an empty guard costs), back to back;
* the store requests per second per node while every rank but rank 0 waits in a guard that
  rank 0 keeps open for ``--wait`` seconds, in the first 5 s (fast beats) and after; and the
  mark keys read per second (a request's size); and the round trip of one store request.

Latency and creation are extrapolated to 1,024, 8,192 and 65,536 ranks as the counted hops times
the cost of one hop measured at the largest size; the store's own work at creation as ranks x
requests per rank x one request's round trip (its one thread serves them in turn). The other
metrics as ``c * world**k`` through the two largest sizes (the table gives ``k``: ~0 is flat).
All ranks share this machine's cores, so latencies are upper bounds of a real network's.
``--baseline REF`` runs the same simulation on the library of another commit (a temporary ``git
worktree``), side by side in one run; ``--render JSON`` redraws the outputs of a run.
Writes ``scale.json``, ``scale.md`` and ``scale.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FAST_WINDOW_S = 5.0  # the pulse beats every 0.5 s for this long, then slows down
EXTRAPOLATE = (1024, 8192, 65536)
LIMIT = timedelta(minutes=10)


# ------------------------------------------------------------------------------- one node
class CountingStore:
    """A store client that counts the requests (and mark keys read) made through it."""

    def __init__(self, store: Any, counts: dict[str, int]) -> None:
        self._store, self.counts = store, counts

    def _count(self, keys: int = 0) -> None:
        self.counts["requests"] += 1
        self.counts["keys"] += keys

    def set(self, key: str, value: Any) -> None:
        self._count()
        self._store.set(key, value)

    def get(self, key: str) -> bytes:
        self._count(1)
        return bytes(self._store.get(key))

    def check(self, keys: list[str]) -> bool:
        self._count(len(keys))
        return bool(self._store.check(keys))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._count(len(keys))
        return list(self._store.multi_get(keys))

    def add(self, key: str, value: int) -> int:
        self._count()
        return int(self._store.add(key, value))

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        self._count()
        return bytes(self._store.compare_set(key, expected, desired))

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self._count()  # one request, held by the server until the keys exist
        self._store.wait(keys, timeout)

    def clone(self) -> CountingStore:
        return CountingStore(self._store.clone(), self.counts)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def counted(world: int, ring: bool | None = None) -> dict[str, Any]:
    """The algorithm's counts at ``world`` ranks: gloo's ring all-reduce (also to connect), or
    the tree (None: whichever the library on ``sys.path`` has)."""
    if ring is None:
        ring = importlib.util.find_spec("accel_utils._side.tree") is None
    if ring:
        hops = 2 * (world - 1)
        return {"op_hops": hops, "creation_hops": hops, "msgs_mean": float(hops),
                "msgs_max": hops}
    from accel_utils._side.tree import children, depth

    sent = [len(children(r, world)) + (r > 0) for r in range(world)]
    return {"op_hops": depth(world), "creation_hops": depth(world),
            "msgs_mean": sum(sent) / world, "msgs_max": max(sent)}


def make_lane(rank: int, world: int, client: Any, counts: dict[str, int]) -> tuple[Any, Any]:
    """A lane as ``lanes.lane_for`` makes it, on ``client`` (this rank's side connection), and
    the store gloo uses (None where the library does not tell)."""
    from torch.distributed.distributed_c10d import PrefixStore

    from accel_utils._side import gloo
    from accel_utils._side.heartbeat import Pulse
    from accel_utils._side.lane import Lane
    from accel_utils._side.wire import Mark, Phase, mark_key

    prefix = "accel_utils/side/scale"
    if hasattr(gloo, "WaitlessStore"):  # one connection per process, shared
        seen = link = gloo.WaitlessStore(PrefixStore(prefix, client))
        pulse_conn = client
    else:  # before: a connection per lane for its heartbeat, one per group (cloned from link)
        seen, link, pulse_conn = None, PrefixStore(prefix, client), client.clone()
    pulse = Pulse(CountingStore(PrefixStore(prefix, pulse_conn), counts), rank, world,
                  f"scale{rank}")
    lane = Lane("scale", rank, world, frozenset(range(world)), link, pulse)
    lane.pulse.store(lambda s: s.set(mark_key(rank), str(Mark(0, Phase.NONE, 0))), None)
    return lane, seen


def node_main(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from accel_utils._side.wire import Kind

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as far as allowed
    world, per = args.world, args.ranks_per_node
    ranks = range(args.node * per, (args.node + 1) * per)
    counts = {"requests": 0, "keys": 0}
    lanes: dict[int, Any] = {}
    out: dict[str, Any] = {"node": args.node, "creation_s": {}, "op_s": {},
                           "creation_requests": {}, **counted(world)}
    start = threading.Barrier(per + 1)

    def rank_main(rank: int) -> None:
        client = dist.TCPStore("127.0.0.1", args.port, world, False, timeout=LIMIT)
        start.wait()
        start.wait()
        client.add("arrived", 1)  # a common start across the node processes (polled: a
        while client.add("arrived", 0) < world:  # store-side wait would skew the start)
            time.sleep(0.01)
        t0 = time.perf_counter()
        lane, seen = make_lane(rank, world, client, counts)
        lanes[rank] = lane
        lane.connect(lane.begin(), "scale", LIMIT, None)
        out["creation_s"][rank] = time.perf_counter() - t0
        if seen is not None:  # gloo's requests, and the lane's mark
            out["creation_requests"][rank] = seen.requests + 1
        start.wait()  # fds counted
        t0 = time.perf_counter()
        for _ in range(args.ops):
            lane.run(lane.begin(), Kind.BARRIER, "", "scale", LIMIT, None)
        out["op_s"][rank] = (time.perf_counter() - t0) / args.ops
        start.wait()  # the guard: rank 0 "works", the others wait in the operation
        if rank == 0:
            time.sleep(args.wait)
        lane.run(lane.begin(), Kind.GUARD, "global", "scale", LIMIT, 30.0)

    before = _open_fds()  # a rank's descriptors: its side group (and before, connections)
    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in ranks]
    for thread in threads:
        thread.start()
    start.wait()
    start.wait()
    start.wait()
    out["fds_per_rank"] = (_open_fds() - before) / per
    start.wait()
    samples = [(0.0, dict(counts))]
    for at in (FAST_WINDOW_S + 0.5, args.wait - 0.5):
        if at > samples[-1][0]:
            time.sleep(at - samples[-1][0])
            samples.append((at, dict(counts)))
    out["samples"] = samples
    for thread in threads:
        thread.join()
    out["fd_limit"] = [soft, hard]
    sys.stdout.write("NODE " + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # lanes and groups end with the process


# ---------------------------------------------------------------------------- orchestrator
def simulate(world: int, args: argparse.Namespace, pythonpath: str) -> dict[str, Any]:
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, world, True, timeout=LIMIT, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, world, False, timeout=LIMIT)
    t0 = time.perf_counter()
    for _ in range(2000):  # one request's round trip: the store serves a creation's in turn
        client.check(["rtt"])
    request_us = (time.perf_counter() - t0) / 2000 * 1e6
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    nodes = world // args.ranks_per_node
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--node", str(n), "--world", str(world), "--port",
         str(server.port), "--ranks-per-node", str(args.ranks_per_node), "--ops", str(args.ops),
         "--wait", str(args.wait)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for n in range(nodes)]
    reports = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=LIMIT.total_seconds())
            lines = [ln for ln in stdout.splitlines() if ln.startswith("NODE ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"node failed (rc={proc.returncode}):\n{stderr[-3000:]}")
            reports.append(json.loads(lines[0][5:]))
    finally:
        for proc in procs:
            proc.kill()
    return {**summarize(world, nodes, reports), "request_us": request_us}


def summarize(world: int, nodes: int, reports: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(i: int, j: int, field: str) -> float:  # per node and second, over all nodes
        total = 0.0
        for rep in reports:
            (t0, c0), (t1, c1) = rep["samples"][i], rep["samples"][j]
            total += (c1[field] - c0[field]) / (t1 - t0)
        return total / nodes

    last = len(reports[0]["samples"]) - 1
    requests = [v for r in reports for v in r["creation_requests"].values()]
    return {
        "world": world,
        "nodes": nodes,
        **{key: reports[0][key] for key in ("op_hops", "creation_hops", "msgs_mean", "msgs_max")},
        "creation_requests": statistics.mean(requests) if requests else None,
        "creation_s": max(max(r["creation_s"].values()) for r in reports),
        "fds_per_rank": statistics.mean(r["fds_per_rank"] for r in reports),
        "op_ms": 1e3 * statistics.median(v for r in reports for v in r["op_s"].values()),
        "store_req_s_per_node_fast": rate(0, 1, "requests"),
        "store_req_s_per_node_slow": rate(1, last, "requests") if last > 1 else None,
        "keys_s_per_node_fast": rate(0, 1, "keys"),
        "keys_s_per_node_slow": rate(1, last, "keys") if last > 1 else None,
    }


METRICS = (("op_hops", "empty op: hops (counted)", "{:,.0f}"),
           ("op_ms", "empty operation (ms)", "{:.2f}"),
           ("op_ms_per_core", "same, a core per rank (ms)", "{:.2f}"),
           ("msgs_mean", "messages sent / rank / op, mean", "{:.2f}"),
           ("msgs_max", "most", "{:,.0f}"),
           ("creation_hops", "creation: hops (counted)", "{:,.0f}"),
           ("creation_s", "side-group creation (s)", "{:.2f}"),
           ("creation_s_per_core", "same, a core per rank (s)", "{:.3f}"),
           ("creation_requests", "store requests / rank to create", "{:.1f}"),
           ("store_busy_s", "store's work at creation (s)", "{:.2f}"),
           ("fds_per_rank", "descriptors / rank", "{:.1f}"),
           ("store_req_s_per_node_fast", "store req/s per node, first 5 s", "{:.1f}"),
           ("store_req_s_per_node_slow", "store req/s per node, later", "{:.2f}"),
           ("keys_s_per_node_slow", "mark keys read/s per node, later", "{:.1f}"))
BY_HOPS = {"op_ms": "op_hops", "creation_s": "creation_hops"}  # time = counted hops x a hop's
COUNTED = ("op_hops", "creation_hops", "msgs_mean", "msgs_max", "creation_requests")


def extrapolate(rows: list[dict[str, Any]], algorithm: Any,
                per_hop: dict[str, float] | None) -> list[dict[str, Any]]:
    """The larger worlds: counts from ``algorithm`` (:func:`counted` of the series' library),
    latency and creation as counted hops x the cost of a hop, at the largest measured size (all
    ranks on this machine's cores: an upper bound) and where a rank has a core of its own
    (``per_hop``, measured on 2 processes); the store's work at creation as ranks x requests
    per rank x one request's round trip; the rest as ``c * world**k`` through the two largest
    measured sizes (``k`` ~0: flat; ~1: linear).
    """
    last = rows[-1]
    fits = {}
    for key, _, _ in METRICS:
        pts = [(math.log(r["world"]), math.log(r[key])) for r in rows[-2:]
               if r.get(key) is not None and r[key] > 0]
        if key not in COUNTED and key not in BY_HOPS and len(pts) == 2 and pts[0][0] != pts[1][0]:
            k = (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])
            fits[key] = (k, pts[1][1] - k * pts[1][0])
    out = []
    for world in EXTRAPOLATE:
        row: dict[str, Any] = {"world": world, "extrapolated": True, **algorithm(world)}
        row["creation_requests"] = last.get("creation_requests")
        for key, hops in BY_HOPS.items():
            row[key] = last[key] / last[hops] * row[hops]
            if per_hop is not None:
                row[f"{key}_per_core"] = per_hop[key] * row[hops]
        for key, (k, c) in fits.items():
            row[key] = math.exp(c) * world ** k
            row[f"{key}_exponent"] = k
        if row["creation_requests"] is not None:
            row["store_busy_s"] = world * row["creation_requests"] * last["request_us"] / 1e6
        out.append(row)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Side channel at scale ({results['date']}, {results['machine']}; "
             f"{results['ranks_per_node']} ranks per node, guard held {results['wait_s']} s, "
             "liveness 30 s; *italic* rows are extrapolated: times as counted hops x a hop's "
             "measured cost (at the largest size, every rank on this machine's cores; and on 2 "
             "processes of 1 rank, a core per rank), the rest as c x world^k through the two "
             "largest sizes)", ""]
    for label, hop in results.get("per_hop", {}).items():
        lines.insert(-1, f"- {label}: a hop costs {1e3 * hop['op_ms']:.0f} us in an operation, "
                         f"{1e3 * hop['creation_s']:.2f} ms in a creation, a core per rank")
    for label, rows in results["series"].items():
        lines += [f"**{label}**", "",
                  "| ranks | " + " | ".join(name for _, name, _ in METRICS) + " |",
                  "|---:|" + "---:|" * len(METRICS)]
        for row in rows:
            cells = ["-" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in METRICS]
            world = f"*{row['world']:,}*" if row.get("extrapolated") else f"{row['world']:,}"
            lines.append(f"| {world} | " + " | ".join(cells) + " |")
        fitted = next((r for r in rows if r.get("extrapolated")), {})
        lines += ["| growth k (cost ~ world^k) | " + " | ".join(
            "-" if fitted.get(f"{k}_exponent") is None else f"{fitted[f'{k}_exponent']:.2f}"
            for k, _, _ in METRICS) + " |", ""]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("op_hops", "op_ms", "op_ms_per_core", "creation_s", "fds_per_rank")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4))
    for ax, key in zip(axes, keys, strict=True):
        for (label, rows), color in zip(results["series"].items(), ("C0", "C1"), strict=False):
            pts = [(r["world"], r[key], r.get("extrapolated", False)) for r in rows
                   if r.get(key)]
            measured = [(w, v) for w, v, extra in pts if not extra]
            if measured:  # measured points solid, extrapolations dashed from the last one
                ax.plot(*zip(*measured, strict=True), marker="o", color=color, label=label)
            ahead = measured[-1:] + [(w, v) for w, v, extra in pts if extra]
            if ahead:
                ax.plot(*zip(*ahead, strict=True), marker="x", linestyle="--", color=color,
                        label=None if measured else label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_title(dict((k, n) for k, n, _ in METRICS)[key], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _algorithm(rows: list[dict[str, Any]]) -> Any:
    """:func:`counted` for the library that measured ``rows`` (told by its counts)."""
    ring = rows[-1]["op_hops"] == counted(rows[-1]["world"], ring=True)["op_hops"]
    return functools.partial(counted, ring=ring and rows[-1]["world"] > 2)


def _worktree(ref: str) -> str:
    path = tempfile.mkdtemp(prefix="accel_utils_baseline_")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", path, ref], check=True,
                   capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 32, 128, 256])
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--ops", type=int, default=20)
    parser.add_argument("--wait", type=float, default=21.0)
    parser.add_argument("--baseline", help="a git ref whose side channel runs side by side")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--render", metavar="JSON", help="only redraw the outputs of a run")
    parser.add_argument("--node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node is not None:
        node_main(args)
        return
    if args.render:
        with open(args.render) as fh:
            write(json.load(fh), args.out)
        return
    variants = {"this tree": REPO}
    if args.baseline:
        variants[f"baseline {args.baseline}"] = _worktree(args.baseline)
    series: dict[str, list[dict[str, Any]]] = {}
    # a hop's cost where every rank has a core of its own: 2 processes of 1 rank
    probe_args = argparse.Namespace(**{**vars(args), "ranks_per_node": 1, "ops": 200,
                                       "wait": 1.0})
    hops: dict[str, dict[str, Any]] = {}
    try:
        for label, tree in variants.items():
            probe = simulate(2, probe_args, tree)
            hops[label] = {"op_ms": probe["op_ms"] / probe["op_hops"],
                           "creation_s": probe["creation_s"] / probe["creation_hops"]}
            print(label, "per hop, a core per rank:", json.dumps(hops[label]), flush=True)
        for world in args.world_sizes:
            for label, tree in variants.items():  # side by side, per world size
                row = simulate(world, args, tree)
                series.setdefault(label, []).append(row)
                print(label, json.dumps(row), flush=True)
    finally:
        for label, tree in variants.items():
            if label != "this tree":
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree],
                               capture_output=True)
    write({"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores",
           "ranks_per_node": args.ranks_per_node, "wait_s": args.wait, "series": series,
           "per_hop": hops},
          args.out)


def write(results: dict[str, Any], out: str) -> None:
    """scale.json, scale.md and scale.png under ``out``, extrapolations made anew."""
    for label, rows in results["series"].items():
        measured = [r for r in rows if not r.get("extrapolated")]
        results["series"][label] = measured + extrapolate(
            measured, _algorithm(measured), results.get("per_hop", {}).get(label))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scale.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(out, "scale.md"), "w") as fh:
        fh.write(markdown(results))
    chart(results, os.path.join(out, "scale.png"))
    print(markdown(results))


if __name__ == "__main__":
    main()
