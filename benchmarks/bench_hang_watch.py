"""What a HangWatch costs a training step: the tiny LM's step with and without it, side by side.

One process, CPU: the step of ``examples/train_tiny_lm.py``'s model (forward, backward and an
AdamW step on a batch of 8 x 32 tokens), timed in interleaved blocks (bench_timing) bare and
with the watch's four calls per step (``step("data")`` and three ``phase()``), the watch
running. The ratio is the median of per-repetition ratios; the calls' own cost is timed alone.

    python benchmarks/bench_hang_watch.py [--reps 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import Variant, rows, time_variants

from accel_utils import HangWatch


def _tiny_lm_step() -> tuple[object, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(1, 64, (8, 32), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None, help="folder for hang_watch.json / .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _, train_step = _tiny_lm_step()
    with HangWatch(stall=600) as watch:
        def watched() -> None:
            watch.step("data")
            watch.phase("forward-backward")
            train_step()
            watch.phase("reduce")
            watch.phase("optimizer")

        variants = [Variant("bare", "tiny-LM step", train_step, inner=5),
                    Variant("watched", "tiny-LM step + HangWatch", watched, inner=5)]
        samples = time_variants(variants, reps=args.reps, warmup=3,
                                device=torch.device("cpu"))
        calls = 200_000
        start = time.perf_counter()
        for _ in range(calls):
            watch.step("data")
            watch.phase("forward-backward")
            watch.phase("reduce")
            watch.phase("optimizer")
        per_step_ns = (time.perf_counter() - start) / calls * 1e9
    table = rows(variants, samples, "bare")
    result = {"rows": table, "watch_calls_per_step_ns": per_step_ns, "reps": args.reps}
    lines = ["| variant | median step | ratio to bare |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['median_s'] * 1e3:.2f} ms | {r['ratio']:.3f} |"
              for r in table]
    lines.append(f"\nThe watch's four calls per step, alone: {per_step_ns:.0f} ns.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "hang_watch.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(args.out, "hang_watch.md"), "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
