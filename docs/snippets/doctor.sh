#!/usr/bin/env bash
# Check a launch before the job: run the doctor exactly like the job (here: 2 local processes).
set -euo pipefail
# --8<-- [start:launch]
torchrun --nproc_per_node 2 --master_port "${PORT:-29500}" \
    -m accel_utils.doctor --path "${CACHE_DIR:-/tmp/doctor-cache}"
# --8<-- [end:launch]
