"""Tokenize a dataset once per node (or once per job) under FirstRankPerNode; the rest load it.

One node, two processes::

    torchrun --nproc_per_node 2 examples/preprocess_guard.py --order local --cache-dir /tmp/tok

Two nodes with node-local disks (here simulated on one host, each "node" its own directory)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port 29533 examples/preprocess_guard.py --order local \\
        --cache-dir '/tmp/tok/node{node}'
    # ... and the same with --node_rank 1 beside it

``--order global`` lets only rank 0 tokenize (a shared filesystem); ``--order auto`` finds out
whether ``--cache-dir`` is shared between the nodes and picks. ``{node}`` in ``--cache-dir``
becomes the node index. Every rank prints one ``PREPROCESS`` line; rank 0 then prints how many
times the map function ran on each node (``MAP_CALLS``) and whether every rank ended with the
same dataset (``SAME_DATASET``). The text is generated: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys

import torch.distributed as dist

import accel_utils
from accel_utils import FirstRankPerNode, resolve

WORDS = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "quick", "slow", "brown",
    "red", "jumps", "sleeps", "over",
]


def generate_texts(rows: int) -> list[str]:
    """Deterministic sentences, the same on every rank."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", choices=["local", "global", "auto"], default="local")
    parser.add_argument("--cache-dir", required=True, help="may contain {node}")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    import datasets

    datasets.disable_progress_bars()
    dist.init_process_group("gloo")
    topo = resolve()
    node = topo.nodes.node_rank
    cache_dir = args.cache_dir.format(node=node)

    texts = generate_texts(args.rows)
    vocab = {word: i + 2 for i, word in enumerate(sorted(WORDS))}  # 0 pad, 1 unknown
    calls = 0

    def tokenize(batch: dict) -> dict:
        nonlocal calls
        calls += 1
        return {"input_ids": [[vocab.get(w, 1) for w in text.split()] for text in batch["text"]]}

    # The cache file is named after the data and the vocabulary: a changed input never loads a
    # stale file (datasets loads an existing cache_file_name without checking the function).
    key = hashlib.sha256(json.dumps([texts, vocab]).encode()).hexdigest()[:16]
    local = {"local": True, "global": False, "auto": "auto"}[args.order]
    guard = FirstRankPerNode(local=local, path=cache_dir if local == "auto" else None)
    with guard as first:
        os.makedirs(cache_dir, exist_ok=True)
        tokenized = datasets.Dataset.from_dict({"text": texts}).map(
            tokenize,
            batched=True,
            batch_size=None,  # one call per pass over the data: calls counts the passes
            remove_columns=["text"],
            cache_file_name=os.path.join(cache_dir, f"tokenized-{key}.arrow"),
        )
    digest = hashlib.sha256(json.dumps(tokenized.to_dict()["input_ids"]).encode()).hexdigest()[:16]
    sys.stdout.write(
        f"PREPROCESS rank={topo.rank} node={node} first={first} calls={calls} "
        f"rows={len(tokenized)} digest={digest}\n"
    )
    sys.stdout.flush()

    everyone: list = [None] * topo.world_size
    dist.all_gather_object(everyone, (node, calls, digest))
    if topo.rank == 0:
        per_node: dict[int, int] = {}
        for rank_node, rank_calls, _ in everyone:
            per_node[rank_node] = per_node.get(rank_node, 0) + rank_calls
        sys.stdout.write(f"MAP_CALLS {json.dumps(per_node)}\n")
        sys.stdout.write(f"SAME_DATASET {len({d for _, _, d in everyone}) == 1}\n")
        sys.stdout.flush()
    accel_utils.destroy_process_group()  # barrier, then destroy_process_group()


if __name__ == "__main__":
    main()
