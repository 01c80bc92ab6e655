"""Preprocess once per node: ``torchrun --nproc_per_node 2 docs/snippets/first_rank.py``."""

import os
import tempfile

from accelerate import Accelerator
from datasets import Dataset, disable_progress_bars, load_from_disk

from accel_utils import FirstRankPerNode, destroy_process_group


def main() -> None:
    disable_progress_bars()
    accelerator = Accelerator(cpu=True)
    cache_dir = os.path.join(tempfile.gettempdir(), "accel_utils_docs_first_rank")
    os.makedirs(cache_dir, exist_ok=True)
    # --8<-- [start:guard]
    path = os.path.join(cache_dir, "squares-v1")  # put what the data depends on in the name
    with FirstRankPerNode(accelerator, local="auto", path=cache_dir) as first:
        if not os.path.isdir(path):  # the first ranks build and save; the others find it
            squares = Dataset.from_dict({"x": list(range(100))}).map(lambda r: {"y": r["x"] ** 2})
            squares.save_to_disk(path)
        data = load_from_disk(path)
    # first is True on the ranks that ran the block first
    # --8<-- [end:guard]
    assert first == (accelerator.process_index == 0) and data[7]["y"] == 49
    destroy_process_group()


if __name__ == "__main__":
    main()
