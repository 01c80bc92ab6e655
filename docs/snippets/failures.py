"""A first rank fails; every rank learns it.

    torchrun --nproc_per_node 2 docs/snippets/failures.py
"""

from accelerate import Accelerator

from accel_utils import FirstRankFailedError, FirstRankPerNode, destroy_process_group


def main() -> None:
    accelerator = Accelerator(cpu=True)
    outcome = "no error"
    # --8<-- [start:failure]
    try:
        with FirstRankPerNode(accelerator) as first:
            if first:
                raise OSError("disk full")  # the first rank's preprocessing fails
    except FirstRankFailedError as err:  # every other rank, within seconds, instead of hanging
        outcome = f"rank {err.rank} on node {err.node} failed: {err.exc_type}: {err.exc_message}"
    except OSError as err:  # the failing rank gets its own exception at once
        outcome = f"this rank failed: {err}"
    print(outcome)
    # --8<-- [end:failure]
    expected = "this rank failed" if accelerator.process_index == 0 else "rank 0 on node 0 failed"
    assert outcome.startswith(expected) and "disk full" in outcome, outcome
    destroy_process_group()


if __name__ == "__main__":
    main()
