"""``python -m accel_utils.doctor`` with one rank SIGKILLed in the middle of its checks.

Usage (under torchrun): ``doctor_dies.py VICTIM_RANK [doctor arguments...]``. The victim kills
itself on entering its 5th side-channel barrier, while the doctor times the side channel: a real
death (SIGKILL), not a simulated one. The rest is the real entry point, run as ``-m`` runs it.
"""

import os
import runpy
import signal
import sys

import torch.distributed as dist

import accel_utils.barriers as barriers

victim = int(sys.argv.pop(1))
real_barrier = barriers.barrier
calls = [0]


def barrier_then_die(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 5 and dist.get_rank() == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_barrier(*args, **kwargs)


barriers.barrier = barrier_then_die  # the doctor imports it when it starts below
runpy.run_module("accel_utils.doctor", run_name="__main__", alter_sys=True)
