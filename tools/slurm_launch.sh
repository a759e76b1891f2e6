#!/usr/bin/env bash
# Shared by slurm_train.sh / slurm_test.sh: `slurm_launch.sh PARTITION JOB_NAME SCRIPT [SCRIPT arguments]`.
# One task per GPU, as mmdet's. Environment: GPUS (total tasks, default 8), GPUS_PER_NODE (8),
# CPUS_PER_TASK (5), SRUN_ARGS, PYTHON. SCRIPT gets --launcher=slurm (it reads SLURM_PROCID/SLURM_NTASKS;
# on nodes without CUDA it initialises gloo itself).
set -x

PARTITION=$1
JOB_NAME=$2
SCRIPT=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PYTHON=${PYTHON:-python}
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "${PYTHON}" -u "$TOOLS/$SCRIPT" "${@:4}" --launcher="slurm"
