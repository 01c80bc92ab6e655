"""accel-utils benchmarks, side by side with what users would otherwise use.

    python benchmarks/run.py                       # everything, world sizes 2 and 4 (a few minutes)
    python benchmarks/run.py --quick --world-sizes 2 --out /tmp/bench   # smoke run (seconds)
    python benchmarks/run.py --readme docs/benchmarks.md   # also refresh the docs page's table

Launches ``torchrun`` on gloo (and on NCCL where there are at least as many GPUs as processes),
times every variant against the floor measured in the same run, and writes ``results.json``,
``results.png`` and ``results.md`` under ``--out`` (default ``benchmarks/results``). Nothing here
is a test: the suite only checks that a quick run works and writes its outputs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import bench_import
import bench_report
import torch
from bench_timing import Variant, rows

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IN_GROUP = ("reduce_loss", "first_rank", "grad_accum")
ALL = (*IN_GROUP, "eval", "import")

FULL = {
    "reps": {"reduce_loss": {"reps": 80, "warmup": 5}, "first_rank": {"reps": 80, "warmup": 5},
             "grad_accum": {"reps": 10, "warmup": 2}},
    "grad_accum": {"k": 8, "width": 1024, "layers": 10, "rows": 8},  # 10.5M parameters
    "eval": {"vocab": 512, "hidden": 64, "samples": 64, "new_tokens": 16, "reps": 3, "warmup": 1,
             "all_cores_row": True},
    "import": {"reps": 7, "warmup": 1},
}
QUICK = {
    "reps": {s: {"reps": 2, "warmup": 1} for s in IN_GROUP},
    "grad_accum": {"k": 8, "width": 64, "layers": 2, "rows": 2},
    "eval": {"vocab": 512, "hidden": 64, "samples": 4, "new_tokens": 2, "reps": 1, "warmup": 0,
             "all_cores_row": False},
    "import": {"reps": 1, "warmup": 0},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, HERE, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # one thread per process, as torchrun sets for several
    if backend == "gloo":
        # CPU runs see no GPU: Accelerate's wait_for_everyone() passes device_ids to its barrier
        # and crashes ranks beyond the host's GPU count.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _launch(script: str, nproc: int | None, cfg: dict, tmp: str, timeout: float) -> dict | list:
    """Run ``script CONFIG`` under torchrun (``nproc`` processes) or alone; its JSON result."""
    name = f"{os.path.splitext(script)[0]}_{len(os.listdir(tmp))}"  # unique per launch
    cfg = {**cfg, "out": os.path.join(tmp, name + ".out.json")}
    cfg_path = os.path.join(tmp, name + ".json")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    cmd = [sys.executable, os.path.join(HERE, script), cfg_path]
    if nproc is not None:
        cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                    "--max_restarts=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(cfg.get("backend", "gloo")), cwd=REPO,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers share the session
        output, _ = proc.communicate()
        raise RuntimeError(
            f"{shlex.join(cmd)} timed out after {timeout}s\n{output[-4000:]}"
        ) from None
    if proc.returncode != 0 or not os.path.exists(cfg["out"]):
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode})\n{output[-4000:]}")
    for line in output.splitlines():
        if line.startswith("[bench]"):
            sys.stderr.write(line + "\n")
    with open(cfg["out"]) as fh:
        return json.load(fh)


def _eval_record(settings: dict, tmp: str, timeout: float) -> dict:
    cfg = {**settings["eval"], "sharded": False, "threads": 1}
    n = cfg["samples"]
    alone = _launch("bench_eval.py", None, cfg, tmp, timeout)
    sharded = _launch("bench_eval.py", 2, {**cfg, "sharded": True}, tmp, timeout)
    variants = [
        Variant("unsharded", f"1 process (1 thread) scores all {n} samples", lambda: None,
                extra={"procs": 1}),
        Variant("accel_utils", f"2 procs (1 thread each) x {n // 2} samples, "
                "dp_eval_sample_shard", lambda: None,
                extra={"outputs_match": alone["outputs_sha1"] == sharded["outputs_sha1"]}),
    ]
    samples = {"unsharded": alone["times"], "accel_utils": sharded["times"]}
    if cfg["all_cores_row"]:  # for reference only: one process given every core
        cores = _launch("bench_eval.py", None, {**cfg, "threads": os.cpu_count()}, tmp, timeout)
        variants.append(Variant("unsharded_cores", f"1 process ({cores['threads_per_process']} "
                                f"threads) scores all {n} samples", lambda: None,
                                extra={"procs": 1}))
        samples["unsharded_cores"] = cores["times"]
    return {"benchmark": "eval", "world_size": 2, "backend": "gloo", "reference": "unsharded",
            "rows": rows(variants, samples, reference="unsharded", paired=False)}


def _backends(world_size: int) -> list[str]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["gloo", "nccl"] if gpus >= world_size else ["gloo"]


def run(args: argparse.Namespace) -> dict:
    """Every selected benchmark; the results dict that the outputs are written from."""
    settings = copy.deepcopy(QUICK if args.quick else FULL)
    if args.reps is not None:
        for suite in IN_GROUP:
            settings["reps"][suite]["reps"] = args.reps
    records: list[dict] = []
    in_group = [s for s in IN_GROUP if s in args.only]
    with tempfile.TemporaryDirectory(prefix="accel_utils_bench_") as tmp:
        for world_size in args.world_sizes:
            for backend in _backends(world_size) if in_group else []:
                cfg = {**settings, "backend": backend, "suites": in_group}
                records += _launch("bench_worker.py", world_size, cfg, tmp, args.timeout)
        if "eval" in args.only:
            records.append(_eval_record(settings, tmp, args.timeout))
            sys.stderr.write("[bench] eval done\n")
    if "import" in args.only:
        imp = settings["import"]
        records.append(bench_import.measure(imp["reps"], imp["warmup"], REPO))
        sys.stderr.write("[bench] import done\n")
    backends = sorted({r["backend"] for r in records if r["backend"] != "-"})
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
        "machine": bench_report.machine(backends),
        "settings": settings,
        "records": records,
    }
    results["targets"] = bench_report.targets(records)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--only", nargs="+", choices=ALL, default=list(ALL))
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions for benchmarks 1-3 (default: 80, 80, 10)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny repetition counts and models: checks that everything runs")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--readme", default=None,
                        help="page to refresh between the markers (docs/benchmarks.md)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    table = bench_report.markdown(results)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(table)
    bench_report.chart(results, os.path.join(args.out, "results.png"))
    if args.readme:
        bench_report.update_readme(args.readme, table)
    sys.stdout.write(table)
    sys.stderr.write(f"[bench] finished in {time.perf_counter() - started:.0f}s; "
                     f"outputs in {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
