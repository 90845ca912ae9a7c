"""The parallel layer: how a model is laid out over processes and devices, kept beside the model as
torchtitan keeps parallelize.py. The model itself knows nothing of this module.

- the DeepSpeed config (ZeRO stage, offload, precision, optimizer) and the engine around the model;
- ZeRO-3: the model built under zero.Init, each block a ZeRO-3 leaf module;
- pipeline stages (pipeline.py builds the stage modules);
- torch.compile of every block (one graph shared by all blocks) and activation checkpointing,
  applied to the block instances from outside.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .config import check_deepspeed_overrides, model_config
from .distributed import Dist
from .baseline import TransformerBlock
from .model import RRWKV, Block
from .schedule import lr_scheduler
from .weights import read_weights

if TYPE_CHECKING:  # the plan is made by plan.make_plan, which calls deepspeed_config below
    from .plan import Plan

# ---- the model on its devices ----

def build_model(cfg: DictConfig, plan: Plan, d: Dist):
    """RRWKV, or with parallel.pipeline_stages > 1 its PipelineModule."""
    if plan.pipeline_stages > 1:
        from .pipeline import data_parallel_rank, pipeline_model
        pipe = pipeline_model(model_config(cfg), plan.pipeline_stages, cfg.run.seed,
                              cfg.train.activation_checkpointing, cfg.parallel.partition_method, cfg.train.l2wrap)
        if data_parallel_rank(pipe) != plan.dp_rank:
            raise RuntimeError(f"DeepSpeed's pipeline grid gives rank {d.rank} data-parallel rank "
                               f"{data_parallel_rank(pipe)}, the plan {plan.dp_rank}: its topology changed")
        apply_block_options(cfg, pipe, d)
        return pipe
    weights = read_weights(model_config(cfg), Path(cfg.run.init_from)) if cfg.run.init_from else None
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init:
        model = build_partitioned(cfg, plan, d, weights)
    else:
        model = RRWKV(model_config(cfg), init_seed=cfg.run.seed)
        if weights is not None:
            model.load_state_dict(weights, strict=True)
    apply_block_options(cfg, model, d)
    return model


def build_partitioned(cfg: DictConfig, plan: Plan, d: Dist, weights: Optional[Dict[str, torch.Tensor]] = None):
    """RRWKV created under ZeRO-3's zero.Init: every parameter is partitioned over the ranks as it is
    made, so no process ever holds the whole model (what 7B/14B need). Each part is then gathered,
    initialized with the same per-layer seeds as RRWKV(init_seed=...) (or given `weights`, by
    name) and partitioned again."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=plan.deepspeed_config()):
        model = RRWKV(model_config(cfg), init_seed=None)
    names = {id(m): n for n, m in model.named_modules()}
    for module, init in model.init_parts(cfg.run.seed):
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if d.rank == 0:
                with torch.no_grad():
                    if weights is None:
                        init(module)
                    else:
                        for n, p in module.named_parameters():
                            p.copy_(weights[f"{names[id(module)]}.{n}"])
    return model


# ---- compile and activation checkpointing, applied to the blocks ----

BLOCKS = (Block, TransformerBlock)     # the repeated layers: RRWKV's and the SDPA baseline's
_compiled: Dict[type, object] = {}


def inductor_settings() -> None:
    """Inductor settings for every compiled block (RRWKV's and the SDPA baseline's).

    Mix-order reductions (inductor's fusion of a row reduction, such as a layer norm's backward, with
    the column reductions of parameter gradients over all tokens; on by default on GPUs since torch
    2.10) are turned off: upstream they give silently wrong gradients for norm-weight patterns once
    the reduction spans about 16k tokens (pytorch/pytorch#193061) and wrongly
    shaped ones for norm-like code (#178080), and on an H100 (torch 2.11, 2026-11-27) the compiled
    1.5B block's backward failed with "CompiledFunctionBackward returned an invalid gradient ... got
    [2048] but expected shape compatible with [1, 1, 2048]" (a time-mix curve) with them on.
    """
    import torch._inductor.config as inductor
    if hasattr(inductor, "triton") and hasattr(inductor.triton, "mix_order_reduction"):
        inductor.triton.mix_order_reduction = False


def compiled(fn):
    """torch.compile(fn) as one full graph, made once per function (compilation itself is lazy)."""
    if fn not in _compiled:
        inductor_settings()
        _compiled[fn] = torch.compile(fn, fullgraph=True)
    return _compiled[fn]


def compile_blocks(model: torch.nn.Module) -> int:
    """Run every block inside `model` (an RRWKV, a pipeline stage, the SDPA baseline) compiled; returns
    how many. All blocks of a kind share one graph: RRWKV's Block.run (around the WKV op, which is a
    torch.library custom op on CUDA, so it sits inside the graph) for calls without a carried state,
    the baseline's whole TransformerBlock.forward."""
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            run = compiled(Block.run)
            m.run = lambda x, st, _m=m, _run=run: _run(_m, x, None) if st is None else Block.run(_m, x, st)
        elif isinstance(m, TransformerBlock):
            m.forward = functools.partial(compiled(TransformerBlock.forward), m)
        else:
            continue
        n += 1
    # The blocks share the graph (Dynamo inlines the module calls and guards on what they hold, not
    # on which block it is: 12 blocks, 1 graph on torch 2.13). Should a torch version
    # guard each block apart, let it compile them all rather than fall back to eager after its
    # default 8 entries.
    import torch._dynamo.config as dynamo
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, key):
            setattr(dynamo, key, max(getattr(dynamo, key), n + 8))
    return n


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing: each block's activations are recomputed in backward instead of kept
    (memory for activations drops to one block's); returns how many blocks.

    PyTorch's composable checkpoint works through module hooks, so parameter names stay as they are
    (checkpoints of either setting load into the other) and the recomputation calls the block as a
    module again, with its other hooks (ZeRO-3's parameter gathering) inside the recomputed region."""
    from torch.distributed._composable import checkpoint as composable_checkpoint
    n = 0
    for m in model.modules():
        if isinstance(m, BLOCKS):
            composable_checkpoint(m)
            n += 1
    return n


def apply_block_options(cfg: DictConfig, model: torch.nn.Module, d: Optional[Dist] = None) -> None:
    """model.compile, then train.activation_checkpointing (recomputing the compiled block), on `model`'s
    blocks. Pipeline stages checkpoint through DeepSpeed's PipelineModule instead (pipeline.py)."""
    if cfg.model.compile:
        n = compile_blocks(model)
        if d is not None:
            d.say(f"model.compile: {n} blocks{' on this stage' if cfg.parallel.pipeline_stages > 1 else ''} run "
                  f"compiled, WKV op included (torch {torch.__version__}; compiled during the first step)")
    if cfg.train.activation_checkpointing and cfg.parallel.pipeline_stages == 1:
        checkpoint_blocks(model)


# ---- DeepSpeed ----

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


def deepspeed_config(cfg: DictConfig, micro_batch_size: int, grad_accum: int, global_batch_size: int,
                     device: torch.device) -> Dict:
    """The DeepSpeed config of a run (plan.make_plan calls it once, after checking the keys' rules)."""
    prec = cfg.train.precision
    stage = cfg.parallel.zero_stage
    offload = cfg.parallel.offload
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
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
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


def build_engine(model: torch.nn.Module, cfg: DictConfig, plan: Plan):
    """deepspeed.initialize with our parameter groups and a warmup + decay schedule."""
    import deepspeed

    groups = param_groups(model, cfg.optim.weight_decay)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_mult"]

    leaves = sorted({type(m) for m in model.modules() if isinstance(m, BLOCKS)}, key=lambda c: c.__name__)
    if cfg.parallel.zero_stage == 3 and leaves:
        # ZeRO-3 gathers a module's parameters in hooks around that module's forward. A block uses its
        # submodules' parameters outside their own forward (time-mix's mixes and decays), and a compiled
        # block cannot run hooks (each one a graph break): gather the whole block's parameters when it
        # starts instead (a ZeRO-3 leaf module).
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, leaves)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=plan.deepspeed_config(),
                                           lr_scheduler=functools.partial(lr_scheduler, optim=cfg.optim,
                                                                          max_steps=plan.max_steps))
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # DeepSpeed checks gradients for inf/NaN only in fp16/bf16; check in fp32 too, so that a
        # non-finite step is skipped (and counted) in every precision instead of poisoning the weights.
        engine.optimizer.check_grad_overflow = True
    return engine
