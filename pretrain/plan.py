"""The run's plan: the config resolved once, at start-up, into everything that depends on several of
its sections or on the number of processes (batch layout, data-parallel size and rank, steps, the
DeepSpeed config).

Every rule that spans several keys is checked here, in one place, before any heavy start-up (data,
model, DeepSpeed); config.validate checks the keys one by one when the config is loaded. Nothing
here changes the config: the trainer reads the run's length, batch layout and DeepSpeed config
from the plan.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch
from omegaconf import DictConfig

from .config import ConfigError
from .parallelize import deepspeed_config


@dataclass(frozen=True)
class Plan:
    world_size: int
    pipeline_stages: int
    data_parallel: int        # processes / pipeline stages
    dp_rank: int              # this process's data-parallel rank: which rows of each batch it reads
    micro_batch_size: int
    grad_accum: int           # micro-batches per optimizer step and rank
    global_batch_size: int    # rows per optimizer step over all ranks
    seq_len: int
    max_steps: int            # train.max_steps, or train.max_tokens in whole steps
    deepspeed: Dict[str, Any]  # the config DeepSpeed is given (a copy each time: it may edit it)

    @property
    def step_tokens(self) -> int:
        return self.global_batch_size * self.seq_len

    def deepspeed_config(self) -> Dict[str, Any]:
        return copy.deepcopy(self.deepspeed)

    def summary(self) -> Dict[str, Any]:
        """The plan without the DeepSpeed config (written to deepspeed_config.json on its own)."""
        out = asdict(self)
        out.pop("deepspeed")
        return out


def check_rules(cfg: DictConfig, world_size: int) -> None:
    """The rules that involve more than one key (or the number of processes): one ConfigError each."""
    p, t = cfg.parallel, cfg.train
    if world_size % p.pipeline_stages:
        raise ConfigError(f"parallel.pipeline_stages ({p.pipeline_stages}) must divide the number of "
                          f"processes ({world_size})")
    dp, mbs = world_size // p.pipeline_stages, cfg.data.micro_batch_size
    if t.global_batch_size and t.global_batch_size % (mbs * dp):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"data.micro_batch_size ({mbs}) x data-parallel ranks ({dp})")
    if p.offload == "all" and p.zero_stage != 3:
        raise ConfigError("parallel.offload=all (parameters too) needs parallel.zero_stage=3; use offload=optimizer")
    if p.offload != "none" and p.zero_stage == 0:
        raise ConfigError("parallel.offload needs parallel.zero_stage >= 1")
    if p.pipeline_stages > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.pipeline_stages > 1 works with parallel.zero_stage 0 or 1, not {p.zero_stage}: "
                          f"ZeRO-2/3 partition the gradients that the pipeline accumulates over its micro-batches")
    if p.pipeline_stages > 1 and cfg.run.init_from:
        raise ConfigError("run.init_from is not supported with parallel.pipeline_stages > 1 yet; fine-tune "
                          "without pipeline stages")
    if t.grad_accum_dtype == "bf16" and t.precision != "bf16":
        raise ConfigError(f"config key 'train.grad_accum_dtype' is 'bf16' but train.precision is '{t.precision}': "
                          f"bf16 gradient accumulation is for bf16 training; set train.precision=bf16 or "
                          f"train.grad_accum_dtype=fp32")


def make_plan(cfg: DictConfig, world_size: int, rank: int, device: torch.device) -> Plan:
    """Check the cross-key rules and resolve the plan of this process (rank `rank` of `world_size`).

    With pipeline stages, DeepSpeed's pipe-by-data topology numbers ranks stage by stage, so the
    data-parallel rank is rank % data_parallel (parallelize.build_model checks it against the
    pipeline's own grid)."""
    check_rules(cfg, world_size)
    dp = world_size // cfg.parallel.pipeline_stages
    mbs = cfg.data.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * dp
    steps = cfg.train.max_steps
    if cfg.train.max_tokens:  # the run's length in tokens: whole steps of the global batch
        steps = -(-cfg.train.max_tokens // (gbs * cfg.data.seq_len))
    ds = deepspeed_config(cfg, mbs, gbs // (mbs * dp), gbs, device)
    return Plan(world_size=world_size, pipeline_stages=cfg.parallel.pipeline_stages, data_parallel=dp,
                dp_rank=rank % dp, micro_batch_size=mbs, grad_accum=gbs // (mbs * dp), global_batch_size=gbs,
                seq_len=cfg.data.seq_len, max_steps=steps, deepspeed=ds)
