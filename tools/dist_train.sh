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
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=${PYTHON:-python}
if [[ -x "$TOOLS/../.venv/bin/python" && -z "${VIRTUAL_ENV:-}" && "$PYTHON" == python ]]; then
  PYTHON="$TOOLS/../.venv/bin/python"
fi

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$TOOLS/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
