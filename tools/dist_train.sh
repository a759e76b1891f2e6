#!/usr/bin/env bash
# Multi-process training with torchrun: `bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args]`.
# mmdet's environment variables: NNODES, NODE_RANK, PORT, MASTER_ADDR. With CUDA each process takes one
# GPU (NCCL); on a CPU-only machine NUM_PROCS gloo processes train together (tools/train.py initialises
# the gloo group itself; torchrun gives each process OMP_NUM_THREADS=1 unless it is set).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG NUM_PROCS [tools/train.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun_launch.sh" train.py "$2" "$1" "${@:3}"
