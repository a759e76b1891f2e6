#!/usr/bin/env bash
# Multi-process testing with torchrun: `bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args]`
# (e.g. `--eval bbox segm`). Same environment variables and CUDA/CPU behaviour as dist_train.sh.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [tools/test.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun_launch.sh" test.py "$3" "$1" "$2" "${@:4}"
