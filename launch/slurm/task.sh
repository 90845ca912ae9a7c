#!/usr/bin/env bash
# One training process of the srun step in launch/slurm/pretrain.sbatch: SLURM's per-task
# variables under the names torch.distributed and DeepSpeed read, then the command itself (exec,
# so the signals srun forwards reach Python directly).
#   srun ... launch/slurm/task.sh python launch/pretrain.py --config ...
set -euo pipefail
: "${SLURM_PROCID:?run this under srun}"
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export NODE_RANK=$SLURM_NODEID
# The batch script starts the same number of tasks on every node and exports LOCAL_WORLD_SIZE.
export LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE:-$((SLURM_NTASKS / SLURM_NNODES))}
: "${MASTER_ADDR:?MASTER_ADDR is not set}" "${MASTER_PORT:?MASTER_PORT is not set}"
echo "rank $RANK of $WORLD_SIZE on node ${SLURMD_NODENAME:-$(hostname)} (local rank $LOCAL_RANK of $LOCAL_WORLD_SIZE)" >&2
exec "$@"
