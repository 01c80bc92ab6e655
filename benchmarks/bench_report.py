"""Turning benchmark records into targets, a Markdown table, a PNG chart and the docs section."""

from __future__ import annotations

import re
import statistics
from typing import Any

TITLES = {
    "reduce_loss": "1. reduce_loss",
    "first_rank": "2. first-rank guard, empty block",
    "grad_accum": "3. grad accumulation step, K=8",
    "eval": "4. generation eval, tiny Llama",
    "import": "5. import cost (fresh interpreter)",
}
README_BEGIN = "<!-- benchmarks:begin (written by benchmarks/run.py --readme) -->"
README_END = "<!-- benchmarks:end -->"


def _row(record: dict, key: str) -> dict | None:
    return next((r for r in record["rows"] if r["key"] == key), None)


def _ratio(row: dict, ref: dict) -> float:
    """``row``'s time over ``ref``'s: median of per-repetition ratios where samples are paired."""
    if row["paired"] and ref["paired"]:
        pairs = zip(row["samples_s"], ref["samples_s"], strict=True)
        return statistics.median(a / b for a, b in pairs)
    return row["median_s"] / ref["median_s"]


def _target(name: str, record: dict, value: float | None, limit: float, op: str,
            shown: str) -> dict:
    met = value is not None and (value <= limit if op == "<=" else value >= limit)
    return {"target": name, "world_size": record["world_size"], "backend": record["backend"],
            "value": value, "limit": limit, "op": op, "met": met, "measured": shown}


def targets(records: list[dict]) -> list[dict]:
    """Each issue target, per world size and backend where it applies, met or not."""
    out = []
    for rec in records:
        mine = _row(rec, "accel_utils")
        kind = rec["benchmark"]
        if mine is None:
            continue
        if kind == "reduce_loss":
            out.append(_target("reduce_loss <= 1.1x floor", rec, mine["ratio"], 1.1, "<=",
                               f"{mine['ratio']:.2f}x"))
        elif kind == "first_rank":
            out.append(_target("FirstRankPerNode <= 1.2x floor", rec, mine["ratio"], 1.2, "<=",
                               f"{mine['ratio']:.2f}x"))
            speedup = _ratio(_row(rec, "seed"), mine)
            out.append(_target("FirstRankPerNode >= 20x faster than a new gloo group per barrier",
                               rec, speedup, 20, ">=", f"{speedup:.0f}x faster"))
        elif kind == "grad_accum":
            counts = mine["allreduces_per_step"]
            exact = 1.0 if counts == [1, 1] else 0.0
            out.append(_target("get_sync_ctx: exactly 1 gradient all-reduce per step", rec, exact,
                               1, ">=", f"{counts[0]}..{counts[1]} per step"))
            ratio = _ratio(mine, _row(rec, "accelerate"))
            out.append(_target("get_sync_ctx step <= 1.02x Accelerator.accumulate", rec, ratio,
                               1.02, "<=", f"{ratio:.3f}x"))
        elif kind == "eval":
            speedup = 1 / mine["ratio"]
            out.append(_target("sharded eval >= 1.7x faster than 1 process", rec, speedup, 1.7,
                               ">=", f"{speedup:.2f}x faster"))
        elif kind == "import":
            added = mine["ratio"] - 1
            out.append(_target("import accel_utils adds <= 10% to import torch", rec, added, 0.10,
                               "<=", f"+{100 * added:.1f}%"))
    return out


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _notes(row: dict) -> str:
    notes = []
    if row.get("allreduces_per_step"):
        lo, hi = row["allreduces_per_step"]
        notes.append(f"{lo} all-reduce/step" if lo == hi else f"{lo}..{hi} all-reduces/step")
    if row.get("heavy_imports"):
        notes.append("pulls " + ", ".join(row["heavy_imports"]))
    if "outputs_match" in row:
        notes.append("same outputs as 1 process" if row["outputs_match"] else "OUTPUTS DIFFER")
    return "; ".join(notes)


def markdown(results: dict) -> str:
    """The results as Markdown: machine, one table of all figures, one table of targets."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpus']} CPU cores, {m['gpus']}, Python {m['python']}, torch {m['torch']}, "
        f"accelerate {m['accelerate']}, transformers {m['transformers']}; backends: "
        f"{', '.join(m['backends'])}. Run {results['date']}: `{results['command']}`.",
        "",
        "Medians of many repetitions after warm-up; `x ref` is the ratio to the first row of the "
        "same benchmark and world size, measured in the same run (the floor, one process, or "
        "`import torch`): the median of the per-repetition ratios where the variants took turns "
        "(benchmarks 1-3 and 5), else the ratio of the medians.",
        "",
        "| Benchmark | Procs | Backend | Variant | Median | x ref | Notes |",
        "| --- | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for rec in results["records"]:
        title = TITLES[rec["benchmark"]]
        for i, row in enumerate(rec["rows"]):
            lines.append(
                f"| {title if i == 0 else ''} | {row.get('procs', rec['world_size'])} | "
                f"{rec['backend']} | "
                f"{row['label']} | {_fmt_time(row['median_s'])} | {row['ratio']:.2f} | "
                f"{_notes(row)} |"
            )
    lines += ["", "| Target | Procs | Backend | Measured | Met |",
              "| --- | ---: | --- | --- | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['world_size']} | {t['backend']} | {t['measured']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: str) -> None:
    """One PNG: a panel per benchmark, each variant's ratio to the reference, per world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in TITLES if any(r["benchmark"] == k for r in results["records"])]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 1.2 + 1.9 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        recs = [r for r in results["records"] if r["benchmark"] == kind]
        labels = list(dict.fromkeys(row["label"] for r in recs for row in r["rows"]))
        height = 0.8 / len(recs)
        top = max(row["ratio"] for r in recs for row in r["rows"])
        for j, rec in enumerate(recs):
            ratios = {row["label"]: row["ratio"] for row in rec["rows"]}
            ys = [i + j * height for i, label in enumerate(labels) if label in ratios]
            values = [ratios[label] for label in labels if label in ratios]
            ax.barh(ys, values, height=height, label=f"{rec['world_size']} proc, {rec['backend']}")
            for y, value in zip(ys, values, strict=True):
                ax.text(value, y, f" {value:.2f}x", va="center", fontsize=6)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        if top > 5:  # the seed's guard is tens of times the floor: log scale keeps the rest legible
            ax.set_xscale("log")
            ax.set_xlim(right=top * 3)
        else:
            ax.set_xlim(0, top * 1.2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(TITLES[kind], fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 1.25), ncol=len(recs),
                  frameon=False)
    axes[-1, 0].set_xlabel("time / reference time (reference = first row of each panel = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long variant labels stay whole
    plt.close(fig)


def update_readme(path: str, table: str) -> None:
    """Replace the text between the benchmark markers of ``path`` (docs/benchmarks.md)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '{README_BEGIN}' ... '{README_END}' markers")
    text = pattern.sub(lambda _: f"{README_BEGIN}\n{table}{README_END}", text)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def machine(backends: list[str]) -> dict[str, Any]:
    """The machine a run came from."""
    import os
    import platform

    import accelerate
    import torch
    import transformers

    gpus = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available() else "no GPU")
    return {"cpus": os.cpu_count(), "gpus": gpus, "python": platform.python_version(),
            "torch": torch.__version__, "accelerate": accelerate.__version__,
            "transformers": transformers.__version__, "backends": backends,
            "platform": platform.platform()}
