"""Process-group set-up for one process (python) or many (deepspeed / srun), on GPUs or CPUs."""
from __future__ import annotations

import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, text: str, err: bool = False) -> None:
        """Print on rank 0 only (stderr with `err`)."""
        if self.is_main:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """The task count of node `node_id` in SLURM's compressed list, e.g. "2(x3),1" -> 2, 2, 2, 1 (0: unknown)."""
    counts = []
    for part in filter(None, tasks_per_node.split(",")):
        n, _, rep = part.partition("(x")
        try:
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return 0
    return counts[node_id] if 0 <= node_id < len(counts) else 0


def init_distributed(timeout_minutes: float = 30.0) -> Dist:
    """Join (or create) the process group: nccl on GPUs, gloo on CPUs.

    Works under the deepspeed launcher, torchrun, srun (SLURM_* mapped to RANK/WORLD_SIZE/LOCAL_RANK/
    LOCAL_WORLD_SIZE; MASTER_ADDR/MASTER_PORT must be set) and as a
    plain single process. On CPUs each local rank gets its share of the cores as torch threads.
    """
    import datetime
    import warnings

    import deepspeed

    # DeepSpeed calls torch.distributed functions that torch has deprecated: one warning per call,
    # thousands per run, nothing for the user to do.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        here = slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""),
                                   int(env.get("SLURM_NODEID", "0")))
        if here and "LOCAL_WORLD_SIZE" not in env:
            env["LOCAL_WORLD_SIZE"] = str(here)
    if "RANK" not in env:  # one plain process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "0")) or 0)
    if local_world <= 0:
        local_world = torch.cuda.device_count() if torch.cuda.is_available() else min(world, os.cpu_count() or 1)
        local_world = max(1, min(local_world, world))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if backend == "gloo" and world == 1:
        _skip_shm_all_reduce()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    if backend == "gloo":
        release_shm_buffers(rank)
    return Dist(rank, world, local_rank, local_world, device)


def _skip_shm_all_reduce() -> None:
    """One process on CPUs: do not build DeepSpeed's shared-memory all-reduce op.

    DeepSpeed compiles that C++ op when its CPU process group starts (about a minute the first time
    on a 2-core machine), even for a single process, which has nothing to reduce. Marking the op
    incompatible makes DeepSpeed use plain gloo, as it does where the op cannot be built.
    """
    try:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):   # a DeepSpeed without that switch: it builds the op
        pass


def shm_buffer_path(rank: int) -> str:
    """The shared-memory file DeepSpeed's CPU all-reduce makes for `rank` (shm.cpp's SHM_BUFFER_NAME scheme)."""
    env = os.environ
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffers(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every local rank has mapped it.

    On CPUs, when all ranks share a machine, DeepSpeed gives each rank a 66 MB file in /dev/shm that the
    other ranks map, and never removes it: every run, even one that ends cleanly, leaves them behind in
    memory until the machine fills (CI died of it). The mappings keep the memory alive for as long as the
    processes run; unlinking the names right after the barrier frees it as soon as they exit, however
    they exit (SIGKILL included).
    """
    import torch.distributed as tdist

    path = shm_buffer_path(rank)
    if not os.path.exists(path):
        return                     # ranks on several machines, or a DeepSpeed without the shm all-reduce
    tdist.barrier()                # every rank has opened every buffer: shm_initialize ran in init_distributed
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def start(cfg) -> Dist:
    """Start the process group and seed every generator (the same seed on every rank: weights agree)."""
    d = init_distributed(timeout_minutes=cfg.parallel.timeout_minutes)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2 ** 32)
    torch.manual_seed(cfg.run.seed)
    if cfg.model.cuda_kernel is False:
        from rrwkv.kernels.wkv import use_cuda_kernel
        use_cuda_kernel(False)
    if cfg.model.kernel_cache:
        os.environ["RRWKV_KERNEL_CACHE"] = str(cfg.model.kernel_cache)
    d.say(f"{d.world_size} process(es) on {d.device.type} started; preparing data and model")
    return d


def shutdown() -> None:
    """Leave the process group cleanly (its threads otherwise abort the interpreter at exit)."""
    import torch.distributed as tdist
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
