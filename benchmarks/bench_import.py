"""Benchmark 5: what ``import accel_utils`` costs on top of ``import torch``.

Each sample is a fresh interpreter timing its own import (interpreter start-up excluded); the two
imports alternate so that disk-cache and load effects hit both alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench_timing import Variant, rows

# Modules that import accel_utils must not pull in (they would cost seconds).
HEAVY = ("accelerate", "transformers", "datasets", "torch.distributed.fsdp")

# What each variant imports. accel_utils loads its public names lazily, so "everything" asks for
# every one of them (all of its modules), after torch, as a training script would.
STATEMENTS = {
    "floor": "import torch",
    "accel_utils": "import torch, accel_utils\n"
                   "for name in accel_utils.__all__: getattr(accel_utils, name)",
    "bare": "import accel_utils",
}
_PROBE = (
    "import json, sys, time\n"
    "t = time.perf_counter()\n"
    "{statement}\n"
    "elapsed = time.perf_counter() - t\n"
    "print(json.dumps([elapsed, [m for m in {heavy!r} if m in sys.modules]]))\n"
)


def _probe(statement: str, env: dict[str, str]) -> tuple[float, list[str]]:
    code = _PROBE.format(statement=statement, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    elapsed, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return elapsed, heavy


def measure(reps: int, warmup: int, repo_root: str) -> dict:
    """The import benchmark's record: ``import torch`` is the reference."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    samples: dict[str, list[float]] = {key: [] for key in STATEMENTS}
    heavy: set[str] = set()
    for rep in range(warmup + reps):
        for key, statement in STATEMENTS.items():
            elapsed, pulled = _probe(statement, env)
            if rep >= warmup:
                samples[key].append(elapsed)
            heavy |= set(pulled) if key != "floor" else set()
    variants = [
        Variant("floor", "import torch", lambda: None),
        Variant("accel_utils", "import torch + accel_utils, every public name loaded",
                lambda: None, extra={"heavy_imports": sorted(heavy)}),
        Variant("bare", "import accel_utils (names load on first use)", lambda: None),
    ]
    return {"benchmark": "import", "world_size": 1, "backend": "-", "reference": "floor",
            "rows": rows(variants, samples, reference="floor")}
