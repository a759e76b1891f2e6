#!/usr/bin/env bash
# Slurm testing, as mmdet's: `GPUS=8 bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [args]`
# (e.g. `--eval bbox segm --work-dir DIR`). Environment: see slurm_launch.sh.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/slurm_launch.sh" "$1" "$2" test.py "$3" "$4" "${@:5}"
