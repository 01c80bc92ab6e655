"""The doctor's verdicts and their printed form: pure functions of the rows every rank sent.

Every rank of ``python -m accel_utils.doctor`` holds the same rows (one dict per rank, built
from :func:`accel_utils.topology.resolve`), so every rank reaches the same verdicts and the same
exit code; rank 0 prints them. Nothing here talks to other processes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

TRIES = 20  # timed side-channel barriers and all-reduces per rank
_HIDDEN_VARS = ("MASTER_ADDR", "MASTER_PORT")  # the same on every rank: shown once, in the header
_LAUNCHER_FIX = (" -> let torchrun / accelerate launch set the rank variables (export none of them "
                 "by hand) and start the same number of processes on every node; without "
                 "torchrun (mpirun, srun) export RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and "
                 "only true values of NODE_RANK / LOCAL_RANK / LOCAL_WORLD_SIZE")


# One rank's facts (or timings), as gathered from every rank: JSON-shaped.
Row = dict[str, Any]


@dataclass
class Check:
    """One verdict: ``status`` is ``OK``, ``WARN`` (a hazard that does not fail the launch),
    ``PROBLEM`` or ``SKIP``; ``message`` says what to do."""

    name: str
    status: str
    message: str


@dataclass
class Report:
    """What the doctor found: the same on every rank (``failures`` name ranks that failed)."""

    rank: int = 0
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return sum(c.status == "PROBLEM" for c in self.checks) + len(self.failures)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def to_json(self) -> Row:
        """The report for scripts and CI systems (``--json``)."""
        return {"exit_code": self.exit_code, "rows": self.rows, "failures": self.failures,
                "checks": [vars(c) for c in self.checks]}


def _by_node(rows: list[Row]) -> dict[int, list[Row]]:
    nodes: dict[int, list[Row]] = {}
    for row in rows:
        nodes.setdefault(row["node"], []).append(row)
    return dict(sorted(nodes.items()))


def check_launcher(rows: list[Row]) -> Check:
    """The launcher's variables agree with the process group and with each other."""
    world = len(rows)
    if not any(r["launcher"] for r in rows):
        return Check("launcher", "OK", f"no launcher variables: {world} process(es)")
    problems = []
    for r in rows:
        env = r["launcher"]
        expected = {"WORLD_SIZE": world, "RANK": r["rank"]}
        if "LOCAL_RANK" in env:
            expected["LOCAL_RANK"] = r["local_rank"]
        for var, want in expected.items():
            if env.get(var) != str(want):
                problems.append(f"rank {r['rank']} sees {var}={env.get(var, 'unset')}, not {want}")
    nodes = _by_node(rows)
    for node, members in nodes.items():
        # the variable itself where set: the resolver trusts it, but it may disagree with the count
        claimed = sorted({m["launcher"].get("LOCAL_WORLD_SIZE", str(m["local_world_size"]))
                          for m in members})
        if claimed != [str(len(members))]:
            problems.append(f"node {node} runs {len(members)} ranks but LOCAL_WORLD_SIZE says "
                            f"{'/'.join(claimed)}")
        local_ranks = sorted(m["local_rank"] for m in members)
        if local_ranks != list(range(len(members))):
            problems.append(f"node {node} has local ranks {local_ranks}, not 0..{len(members) - 1}")
        hosts = sorted({m["host"] for m in members})
        if len(hosts) > 1:
            problems.append(f"node {node} spans hosts {', '.join(hosts)}")
    if list(nodes) != list(range(len(nodes))):
        problems.append(f"node indices {list(nodes)} are not 0..{len(nodes) - 1}")
    claimed_nodes = sorted({r["num_nodes"] for r in rows})
    if claimed_nodes != [len(nodes)]:
        problems.append(f"ranks run on {len(nodes)} node(s), the launcher says {claimed_nodes}")
    if problems:
        return Check("launcher", "PROBLEM", "; ".join(problems) + _LAUNCHER_FIX)
    return Check("launcher", "OK", f"{world} ranks on {len(nodes)} node(s), "
                 f"{world // len(nodes)} per node, as the launcher says")


def check_accelerate(rows: list[Row]) -> Check:
    """Accelerate's state counts the same processes, in the same order, as torch.distributed."""
    first = rows[0]["accelerate"]
    if "skip" in first:
        return Check("accelerate", "SKIP", first["skip"])
    world = len(rows)
    bad = [r for r in rows if "error" in r["accelerate"] or (
        r["accelerate"]["num_processes"], r["accelerate"]["process_index"],
        r["accelerate"]["local_process_index"]) != (world, r["rank"], r["local_rank"])]
    if not bad:
        return Check("accelerate", "OK", f"{first['call']} agrees with torch.distributed on every "
                     f"rank ({first['type']}, {world} process(es))")
    local_only = [r for r in bad if "error" not in r["accelerate"] and (
        r["accelerate"]["num_processes"], r["accelerate"]["process_index"]) == (world, r["rank"])]
    if len(local_only) == len(bad) and not any("LOCAL_RANK" in r["launcher"] for r in rows):
        # a launch without LOCAL_RANK (mpirun / srun recipes): Accelerate falls back to 0
        ranks = ", ".join(str(r["rank"]) for r in bad)
        return Check("accelerate", "WARN", f"{first['call']} agrees with torch.distributed on "
                     f"ranks and process count ({first['type']}, {world} process(es)), but the "
                     "launcher set no LOCAL_RANK, so its local_process_index is wrong on "
                     f"rank(s) {ranks} (it falls back to 0): Accelerate's "
                     "is_local_main_process and local_main_process_first() treat them as their "
                     "node's first rank -> guard "
                     "node-local work with accel_utils.FirstRankPerNode (node identity checked "
                     "as above), or export LOCAL_RANK and LOCAL_WORLD_SIZE on every process")
    facts = bad[0]["accelerate"]
    said = facts.get("error") or (f"{facts['num_processes']} process(es), process index "
                                  f"{facts['process_index']} ({facts['type']})")
    if facts.get("num_processes") == 1:
        fix = ("on machines without GPUs create Accelerator(cpu=True) / PartialState(cpu=True), "
               "or every rank trains as if it were rank 0 alone")
    else:
        fix = "let Accelerate read the launcher's variables (set none of them by hand)"
    ranks = ", ".join(str(r["rank"]) for r in bad)
    return Check("accelerate", "PROBLEM", f"{facts['call']} on rank(s) {ranks} reports {said} "
                 f"while torch.distributed has {world} processes -> {fix}")


def check_path(rows: list[Row], path: str | None, shared: bool | None) -> Check:
    """``path`` is writable everywhere; shared or node-local; free space per node."""
    if path is None:
        return Check("path", "SKIP", "no --path given")
    bad = [f"rank {r['rank']}: {r['path']['error']}" for r in rows if r["path"]["error"]]
    if bad:
        return Check("path", "PROBLEM", f"{path}: {'; '.join(bad)} -> create it on every node, "
                     "writable by the job's user")
    space = ", ".join(f"node {n} {min(m['path']['free_bytes'] for m in members) / 2**30:.1f} GiB "
                      "free" for n, members in _by_node(rows).items())
    if shared is None:
        verdict = "one node, so sharing between nodes does not arise"
    elif shared:
        verdict = "shared by the nodes: FirstRankPerNode(local='auto') lets rank 0 alone go first"
    else:
        verdict = "node-local: FirstRankPerNode(local='auto') lets each node's rank 0 go first"
    return Check("path", "OK", f"{path} is writable on every rank; {verdict}; {space}")


def check_side_channel(rows: list[Row], timings: list[Row] | None) -> Check:
    """The gloo side channel's barrier and all-reduce times (medians), and the slowest rank."""
    if timings is None:
        return Check("side channel", "SKIP", "one process: no side channel needed")
    median = {op: statistics.median(t[op] for t in timings) for op in ("barrier", "all_reduce")}
    slowest = max(range(len(timings)), key=lambda r: sum(timings[r].values()))
    slow = timings[slowest]
    return Check("side channel", "OK", f"gloo side group up; median of {TRIES} tries: barrier "
                 f"{median['barrier']:.2f} ms, all-reduce {median['all_reduce']:.2f} ms; slowest "
                 f"rank {slowest} (node {rows[slowest]['node']}): {slow['barrier']:.2f} ms, "
                 f"{slow['all_reduce']:.2f} ms")


def check_cuda(rows: list[Row]) -> Check:
    """No two ranks of a node use the same physical GPU (NCCL refuses that)."""
    users: dict[tuple[int, str], list[int]] = {}
    for r in rows:
        if r["gpu"]:
            users.setdefault((r["node"], r["gpu"]), []).append(r["rank"])
    if not users:
        return Check("cuda", "SKIP", "no rank uses a CUDA device")
    shared = [f"node {node}: ranks {ranks} share {gpu}" for (node, gpu), ranks in users.items()
              if len(ranks) > 1]
    if shared:
        return Check("cuda", "PROBLEM", "; ".join(shared) + " -> NCCL refuses this ('Duplicate "
                     "GPU detected'): start at most one process per GPU, each on cuda:LOCAL_RANK")
    return Check("cuda", "OK", f"{sum(map(len, users.values()))} ranks, each on its own GPU")


def checks(rows: list[Row], path: str | None, shared: bool | None,
           timings: list[Row] | None) -> list[Check]:
    """Every verdict, in the order they are printed."""
    return [check_launcher(rows), check_accelerate(rows), check_path(rows, path, shared),
            check_side_channel(rows, timings), check_cuda(rows)]


def _cells(row: Row) -> list[str]:
    acc = row["accelerate"]
    if "skip" in acc or "error" in acc:
        accelerate = "-" if "skip" in acc else "error"
    else:
        accelerate = f"{acc['type']} {acc['process_index']}/{acc['num_processes']}"
    launcher = " ".join(f"{k}={v}" for k, v in row["launcher"].items() if k not in _HIDDEN_VARS)
    return [str(row["rank"]), f"{row['node']}/{row['num_nodes']}",
            f"{row['local_rank']}/{row['local_world_size']}", row["host"], str(row["pid"]),
            row["device"], row["backend"] or "-", accelerate, launcher or "-"]


def render(report: Report) -> str:
    """The table (sorted by node and local rank), the checks and the verdict."""
    lines = []
    if report.rows:
        rows = sorted(report.rows, key=lambda r: (r["node"], r["local_rank"], r["rank"]))
        env = rows[0]["launcher"]
        where = (f"; rendezvous {env['MASTER_ADDR']}:{env.get('MASTER_PORT', '?')}"
                 if "MASTER_ADDR" in env else "")
        lines.append(f"accel-utils doctor: {len(rows)} rank(s) on {len(_by_node(rows))} "
                     f"node(s){where}")
        table = [["rank", "node", "local", "host", "pid", "device", "backend", "accelerate",
                  "launcher"], *map(_cells, rows)]
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                  for line in table]
        lines.append("")
    lines += [f"{c.status:<8} {c.name}: {c.message}" for c in report.checks]
    lines += [f"PROBLEM  {failure}" for failure in report.failures]
    verdict = (f"{report.problems} problem(s): exit 1" if report.problems
               else "all checks passed: exit 0")
    return "\n".join([*lines, verdict])
