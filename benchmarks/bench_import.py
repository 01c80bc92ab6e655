"""Benchmark 5: what ``import accel_utils`` costs on top of ``import torch``.

Each sample is a fresh interpreter timing its own import (interpreter start-up excluded); the two
imports alternate so that disk-cache and load effects hit both alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from bench_timing import Variant, rows

# Modules that import accel_utils must not pull in (they would cost seconds).
HEAVY = ("accelerate", "transformers", "datasets", "torch.distributed.fsdp")

# Each interpreter times its own imports (start-up excluded). accel_utils loads its public names
# lazily, so after torch it asks for every one of them (all of its modules), as a training script
# would; torch and accel_utils are timed in the same interpreter, so the ratio is per interpreter.
_PROBE = (
    "import json, sys, time\n"
    "t0 = time.perf_counter()\n"
    "import torch\n"
    "t1 = time.perf_counter()\n"
    "import accel_utils\n"
    "for name in accel_utils.__all__: getattr(accel_utils, name)\n"
    "t2 = time.perf_counter()\n"
    "print(json.dumps([t1 - t0, t2 - t1, [m for m in {heavy!r} if m in sys.modules]]))\n"
)
_BARE = (
    "import time\n"
    "t = time.perf_counter()\n"
    "import accel_utils\n"
    "print(time.perf_counter() - t)\n"
)


def _run(code: str, env: dict[str, str]) -> Any:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(reps: int, warmup: int, repo_root: str) -> dict:
    """The import benchmark's record: ``import torch`` is the reference."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    samples: dict[str, list[float]] = {"floor": [], "accel_utils": [], "bare": []}
    heavy: set[str] = set()
    for rep in range(warmup + reps):
        torch_s, ours_s, pulled = _run(_PROBE.format(heavy=HEAVY), env)
        bare_s = _run(_BARE, env)
        heavy |= set(pulled)
        if rep >= warmup:
            samples["floor"].append(torch_s)
            samples["accel_utils"].append(torch_s + ours_s)
            samples["bare"].append(bare_s)
    variants = [
        Variant("floor", "import torch", lambda: None),
        Variant("accel_utils", "import torch, then accel_utils with every public name loaded",
                lambda: None, extra={"heavy_imports": sorted(heavy)}),
        Variant("bare", "import accel_utils alone (names load on first use)", lambda: None),
    ]
    return {"benchmark": "import", "world_size": 1, "backend": "-", "reference": "floor",
            "rows": rows(variants, samples, reference="floor")}
