#!/usr/bin/env bash
# Shared by dist_train.sh / dist_test.sh: `torchrun_launch.sh SCRIPT NUM_PROCS [SCRIPT arguments]`.
# mmdet's environment variables: NNODES, NODE_RANK, PORT, MASTER_ADDR; PYTHON (default: the repo's .venv).
set -euo pipefail
SCRIPT=$1
GPUS=$2
# A process count torchrun would misread (0, -1, 'four') is refused here, naming the value.
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "tools/dist_${SCRIPT%.py}.sh: NUM_PROCS must be a positive integer (processes per node), got '$GPUS'" >&2
  exit 2
fi
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
    "$TOOLS/$SCRIPT" \
    "${@:3}" \
    --launcher pytorch
