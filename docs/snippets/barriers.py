"""Barriers that log and name the late ranks.

    torchrun --nproc_per_node 2 docs/snippets/barriers.py
"""

import logging
from datetime import timedelta

from accelerate import Accelerator

from accel_utils import barrier, barrier_and_log, destroy_process_group
from accel_utils.barriers import _barrier_with_timeout


def main() -> None:
    logging.basicConfig(level=logging.INFO)  # the script configures logging; accel-utils never does
    accelerator = Accelerator(cpu=True)
    # --8<-- [start:barrier]
    barrier_and_log("checkpoint written", accelerator)  # or a ProcessGroup, a DeviceMesh, None
    # rank 0 logs: [2026-11-27T11:03:30.280] checkpoint written (barrier took 0.602s; last to
    # arrive: rank 1)
    barrier(accelerator, timeout=timedelta(minutes=5))  # raises, naming who did not come
    # --8<-- [end:barrier]
    # --8<-- [start:bounded]
    if not _barrier_with_timeout(timedelta(minutes=5), accelerator):  # the seed's private helper
        raise SystemExit("a rank did not arrive within 5 minutes (the warning names it)")
    # --8<-- [end:bounded]
    destroy_process_group()


if __name__ == "__main__":
    main()
