"""Tokenize a dataset once per node (or once per job) under FirstRankPerNode; the rest load it.

One node, two processes (with no ``--cache-dir``, rank 0 makes a fresh temporary directory,
shares its name with every rank and removes it at the end)::

    torchrun --nproc_per_node 2 examples/preprocess_guard.py
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
import shutil
import sys
import tempfile

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


def fresh_cache_dir() -> str:
    """A new temporary directory made by rank 0, its name shared with every rank.

    On other hosts the same path is created by the guard's ``os.makedirs`` (node-local disks).
    """
    name = [tempfile.mkdtemp(prefix="accel_utils_preprocess_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", choices=["local", "global", "auto"], default="local")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="may contain {node}; default: a fresh temporary directory (made by rank 0, "
        "removed at the end)",
    )
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    import datasets

    datasets.disable_progress_bars()
    dist.init_process_group("gloo")
    topo = resolve()
    node = topo.nodes.node_rank
    fresh = args.cache_dir is None
    cache_dir = fresh_cache_dir() if fresh else args.cache_dir.format(node=node)

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
        f"rows={len(tokenized)} digest={digest} cache_dir={cache_dir}\n"
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
    del tokenized  # the arrow file is memory-mapped: release it before the directory goes
    accel_utils.destroy_process_group()  # barrier, then destroy_process_group()
    if fresh and topo.nodes.local_rank == 0:  # every rank of every node is done with it
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
