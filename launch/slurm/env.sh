# Environment of every training process launched by launch/slurm/pretrain.sbatch: the NCCL and
# PyTorch distributed settings in one place. Sourced by the batch script before `srun`; a variable
# already set in the submitting shell (sbatch exports it) wins over the default here.
# For `deepspeed --hostfile` launches put the same lines in ./.deepspeed_env (see docs/cluster.md).

# NVLink SHARP (multicast) collectives off: NCCL 2.17+ enables them on NVSwitch systems (H100/H200
# HGX) and they fail or hang where the fabric manager / IMEX setup does not support them; the
# bandwidth they add is small for the all-reduce / reduce-scatter sizes ZeRO uses.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Errors and warnings in the job log; INFO (or NCCL_DEBUG_SUBSYS=INIT,NET) when debugging a hang.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A collective that fails or times out aborts the process (and so the job) instead of hanging
# until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand: retry timeout 2^22 * 4.096 us (~17 s) so a flapping link is survived, not fatal.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# Site-specific, left to the site (set them in the submitting shell or here):
#   NCCL_SOCKET_IFNAME=ib0 / GLOO_SOCKET_IFNAME=ib0   the interface of the bootstrap / gloo traffic
#   NCCL_IB_HCA=mlx5                                  which HCAs to use
#   NCCL_CROSS_NIC=0|1, NCCL_NET_GDR_LEVEL=PHB        GPUDirect RDMA topology
