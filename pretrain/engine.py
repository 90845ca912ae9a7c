"""DeepSpeed engine: the ZeRO / precision / optimizer configuration and one training step.

The model knows nothing of this module; here it is wrapped, its parameters grouped, and the
DeepSpeed config written from the experiment config.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, check_deepspeed_overrides
from .schedule import lr_factor

# Parameters RWKV-4 trains without weight decay and with larger learning rates.
NO_DECAY = ("time_decay", "time_first", "medium_decay", "time_mix", "ln", "emb.weight", "bias")
LR_MULT = {"time_decay": 2.0, "medium_decay": 2.0, "time_first": 3.0}


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW groups: (decay or not) x lr multiplier. Each group carries `lr_mult`."""
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        mult = LR_MULT.get(leaf, 1.0)
        decay = 0.0 if (p.dim() < 2 or any(t in name for t in NO_DECAY)) else weight_decay
        key = (decay, mult)
        g = groups.setdefault(key, {"params": [], "weight_decay": decay, "lr_mult": mult, "names": []})
        g["params"].append(p)
        g["names"].append(name)
    out = []
    for g in groups.values():
        g.pop("names")
        out.append(g)
    return out


@dataclass
class BatchLayout:
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    data_parallel: int
    dp_rank: int


def batch_layout(cfg: DictConfig, data_parallel: int, dp_rank: int) -> BatchLayout:
    mbs = cfg.data.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * data_parallel
    if gbs % (mbs * data_parallel):
        raise ConfigError(f"train.global_batch_size ({gbs}) must be a multiple of data.micro_batch_size ({mbs}) "
                          f"x data-parallel ranks ({data_parallel})")
    if cfg.train.max_tokens:  # the run's length in tokens: whole steps of the global batch
        cfg.train.max_steps = -(-cfg.train.max_tokens // (gbs * cfg.data.seq_len))
    return BatchLayout(mbs, gbs // (mbs * data_parallel), gbs, data_parallel, dp_rank)


def deepspeed_config(cfg: DictConfig, layout: BatchLayout, device: torch.device) -> Dict:
    prec = cfg.train.precision
    stage = cfg.parallel.zero_stage
    offload = cfg.parallel.offload
    if offload == "all" and stage != 3:
        raise ConfigError("parallel.offload=all (parameters too) needs parallel.zero_stage=3; use offload=optimizer")
    if offload != "none" and stage == 0:
        raise ConfigError("parallel.offload needs parallel.zero_stage >= 1")
    if cfg.parallel.pipeline_stages > 1 and stage > 1:
        raise ConfigError(f"parallel.pipeline_stages > 1 works with parallel.zero_stage 0 or 1, not {stage}: ZeRO-2/3 "
                          f"partition the gradients that the pipeline accumulates over its micro-batches")
    zero: Dict = {"stage": stage}
    if stage >= 1:
        bucket = int(cfg.parallel.bucket_size)
        zero.update(contiguous_gradients=True, overlap_comm=device.type == "cuda",
                    reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(cfg.parallel.prefetch_bucket_size)
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    o = cfg.optim
    adam = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    if offload == "none" and (device.type != "cuda" or not o.fused_adam):
        adam["torch_adam"] = True  # DeepSpeed's FusedAdam is CUDA-only and JIT-built
        if device.type == "cuda":
            adam["fused"] = True   # torch's own fused CUDA AdamW: one kernel launch per group, no build
    ds = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": cfg.train.fp16_initial_scale_power},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if prec == "bf16":
        ds["data_types"] = {"grad_accum_dtype": cfg.train.grad_accum_dtype}
    return merge_deepspeed_overrides(ds, cfg.parallel.deepspeed)


def merge_deepspeed_overrides(ds: Dict, overrides) -> Dict:
    """`ds` with parallel.deepspeed merged in (nested mappings merged key by key, other values replace)."""
    if overrides is None:
        return ds
    check_deepspeed_overrides(overrides)
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)

    def merge(into: Dict, new: Dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(ds, overrides)
    return ds


def build_engine(model: torch.nn.Module, cfg: DictConfig, layout: BatchLayout, device: torch.device):
    """deepspeed.initialize with our parameter groups and a warmup + decay schedule."""
    import deepspeed

    schedule = functools.partial(lr_factor, warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps,
                                 lr=cfg.optim.lr, lr_final=cfg.optim.lr_final, schedule=cfg.optim.schedule)
    groups = param_groups(model, cfg.optim.weight_decay)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_mult"]

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    from .model import Block
    if cfg.parallel.zero_stage == 3 and any(isinstance(m, Block) for m in model.modules()):
        # ZeRO-3 gathers a module's parameters in hooks around that module's forward. A block uses its
        # submodules' parameters outside their own forward (time-mix's mixes and decays), and a compiled
        # block cannot run hooks (each one a graph break): gather the whole block's parameters when it
        # starts instead (a ZeRO-3 leaf module).
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, [Block])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(cfg, layout, device),
                                           lr_scheduler=make_scheduler)
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # DeepSpeed checks gradients for inf/NaN only in fp16/bf16; check in fp32 too, so that a
        # non-finite step is skipped (and counted) in every precision instead of poisoning the weights.
        engine.optimizer.check_grad_overflow = True
    return engine


class L2Wrap(torch.autograd.Function):
    """RWKV-4's logit regularizer: identity on the loss; in backward, a push of 1e-4 / (B*T) times the
    largest logit of each position back down (it keeps logits from drifting up in bf16)."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        top, ids = torch.max(logits, -1, keepdim=True)
        g = torch.zeros_like(logits)
        g.scatter_(-1, ids, top * factor)
        return grad_output, g * grad_output.to(g.dtype)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, l2wrap: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (with RWKV-4's L2Wrap in backward if asked)."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return L2Wrap.apply(loss, logits) if l2wrap else loss


def current_lr(engine) -> float:
    """The base-group learning rate the next optimizer step uses."""
    for g in engine.optimizer.param_groups:
        if g.get("lr_mult", 1.0) == 1.0:
            return float(g["lr"])
    return float(engine.optimizer.param_groups[0]["lr"])


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return isinstance(engine, PipelineEngine)


def injected_fault(step: int) -> bool:
    """Tests: RRWKV_FAULT_NONFINITE_STEPS=3,5 makes the loss of those (1-based) steps infinite."""
    spec = os.environ.get("RRWKV_FAULT_NONFINITE_STEPS", "")
    return str(step) in spec.split(",")


def train_step(engine, batches, device: torch.device, step: int = 0, l2wrap: bool = False) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the loss averaged over all ranks."""
    if is_pipeline(engine):  # the pipeline engine schedules the micro-batches itself
        return float(engine.train_batch(data_iter=iter(batches)))
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = lm_loss(engine(input_ids), labels, l2wrap)
        if injected_fault(step):
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()
        total += loss.detach().double()
        n += 1
    return all_reduce_mean(total / n)


def all_reduce_sum(n: int, device: torch.device) -> int:
    import torch.distributed as dist
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def all_reduce_mean(x: torch.Tensor) -> float:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


@torch.no_grad()
def evaluate(engine, batches, device: torch.device) -> float:
    """Mean loss over the given batches (all ranks)."""
    if is_pipeline(engine):
        batches = list(batches)
        losses = [float(engine.eval_batch(data_iter=iter([b]), num_micro_batches=1)) for b in batches]
        return all_reduce_mean(torch.tensor(sum(losses) / max(len(losses), 1), dtype=torch.float64, device=device))
    was_training = engine.module.training
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for input_ids, labels in batches:
        total += lm_loss(engine(input_ids.to(device)), labels.to(device)).double()
        n += 1
    if was_training:
        engine.train()
    return all_reduce_mean(total / max(n, 1))
