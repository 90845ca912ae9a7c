"""Typed experiment configuration (omegaconf structured configs).

`load_config(paths, overrides)` merges YAML files in order, then `key=value` overrides, onto the
schema below. Unknown keys are an error naming the nearest valid key; bad values are an error
naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .model import RRWKVConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(RRWKVConfig))


class ConfigError(ValueError):
    """A user-facing configuration problem (one sentence: the key and what to do)."""


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    seed: int = 1234
    resume: str = "auto"                 # auto | none | PATH (an OUT_DIR/checkpoints or a tag inside it)
    init_from: Optional[str] = None      # an exported MODEL_DIR: weights only (fine-tuning)


@dataclass
class ModelSection(RRWKVConfig):
    """The RRWKVConfig fields (pretrain/model.py, one definition) plus how to run the WKV op."""
    cuda_kernel: bool = True             # false: the PyTorch reference also on GPUs
    kernel_cache: Optional[str] = None   # where the compiled CUDA kernel is cached (shared FS on clusters)
    compile: bool = False                # torch.compile each block, WKV op included, as one graph (pretrain/parallelize.py)


@dataclass
class DataSection:
    # A shard directory / manifest.json, a list of {path, weight} to mix, or "builtin" (the small
    # corpus built from Python's standard library, cached under cache_dir).
    train: Any = "builtin"
    valid: Any = None
    seq_len: int = 256
    micro_batch_size: int = 8
    num_workers: int = 0                 # DataLoader workers of each rank's training and validation streams
    cache_dir: Optional[str] = None      # built-in corpus cache; default $RRWKV_CACHE_DIR or ~/.cache/rrwkv


@dataclass
class OptimSection:
    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 10
    schedule: str = "cosine"             # cosine | linear | exponential | constant | wsd
    decay_fraction: float = 0.2          # wsd: the last fraction of train.max_steps that decays to lr_final
    decay_shape: str = "linear"          # wsd: linear | 1-sqrt (Hägele et al. 2024)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fused_adam: bool = True              # DeepSpeed's FusedAdam on GPUs (JIT-built once); false: torch's fused AdamW


@dataclass
class TrainSection:
    max_steps: int = 100
    max_tokens: int = 0                  # > 0: train this many tokens (sets max_steps from the global batch)
    global_batch_size: int = 0           # 0: micro_batch_size x data-parallel ranks (no accumulation)
    precision: str = "fp32"              # bf16 | fp16 | fp32
    log_every: int = 10
    eval_every: int = 0                  # 0: no validation during training
    eval_batches: int = 8
    eval_tasks: List[str] = field(default_factory=list)          # lm-eval task names scored during training
                                         # (docs/training.md, Downstream evaluation); empty: off
    eval_tasks_every: int = 1000         # steps between them (and after the last step)
    eval_tasks_include: List[str] = field(default_factory=list)  # folders of local lm-eval task YAML files
    eval_tasks_limit: int = 0            # documents per task (0: all)
    save_every: int = 0                  # 0: only at the end
    keep_last: int = 2
    async_save: bool = False             # copy the state to host memory, write the files in a background thread
    activation_checkpointing: bool = False
    peak_tflops: Optional[float] = None  # for MFU; default: the card's dense bf16 peak, or measured on CPU
    max_bad_steps: int = 10              # stop after this many non-finite steps in a row (0: never)
    spike_factor: float = 3.0            # loss above this x its running median is a spike (0: no spike guard)
    spike_history: int = 100             # steps in that running median
    spike_steps: int = 3                 # a spike this long rolls back to the last checkpoint and skips its data
    max_rollbacks: int = 5               # a spike after this many rollbacks stops the run (exit 3)
    l2wrap: bool = True                  # RWKV-4's logit regularizer
    fp16_initial_scale_power: int = 12   # fp16 dynamic loss scaling starts at 2**this
    grad_accum_dtype: str = "fp32"       # bf16 training: fp32 | bf16 (gradients accumulated in bf16: half the
                                         # gradient memory, e.g. ZeRO-1 pipeline stages of a 14B model on 80 GB)


@dataclass
class ParallelSection:
    zero_stage: int = 2
    pipeline_stages: int = 1
    partition_method: str = "parameters"  # pipeline stage balance: parameters | uniform | type:BlockPipe
    offload: str = "none"                # none | optimizer | all
    zero_init: bool = True               # ZeRO-3: create parameters partitioned (deepspeed.zero.Init)
    bucket_size: int = 500_000_000       # elements per gradient reduce / parameter all-gather bucket (ZeRO >= 1)
    prefetch_bucket_size: int = 50_000_000  # ZeRO-3: elements of parameters fetched ahead of their use
    timeout_minutes: float = 30.0        # collective operations time out after this
    stall_timeout_s: float = 900.0       # report a rank whose step has not advanced for this long (0: off)
    # Merged last into the DeepSpeed config that pretrain/engine.py builds (e.g.
    # parallel.deepspeed.bf16.immediate_grad_update=true); DeepSpeed keys that other keys here set
    # (OWNED_DEEPSPEED_KEYS) are refused when the config is loaded, naming the key to use instead.
    deepspeed: Any = field(default_factory=dict)


@dataclass
class WandbSection:
    mode: str = "offline"                # disabled | offline | online
    project: str = "rrwkv"
    name: Optional[str] = None


@dataclass
class LoggingSection:
    wandb: WandbSection = field(default_factory=WandbSection)
    progress: bool = True                # tqdm bar on a terminal (rank 0)
    tensorboard: bool = False            # also write every metrics row's numbers to OUT_DIR/tensorboard


@dataclass
class ExperimentConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


CHOICES = {
    "run.resume": None,  # free-form, checked at resume time
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.grad_accum_dtype": ("fp32", "bf16"),
    "parallel.offload": ("none", "optimizer", "all"),
    "logging.wandb.mode": ("disabled", "offline", "online"),
    "optim.schedule": ("cosine", "linear", "exponential", "constant", "wsd"),
    "optim.decay_shape": ("linear", "1-sqrt"),
}


def _flatten(node: Any, prefix: str = "") -> List[str]:
    """Dotted keys of a plain (non-structured) config tree."""
    out = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k}"
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                out += _flatten(child, full + ".")
            else:
                out.append(full)
    return out


def _schema_keys() -> List[str]:
    return _flatten(OmegaConf.structured(ExperimentConfig))


def describe_keys() -> str:
    """Every config key with its default (and choices), grouped by section: the `--help` epilog."""
    schema = OmegaConf.structured(ExperimentConfig)
    lines, section = ["config keys (key=value overrides; docs/training.md explains each):"], None
    for key in _schema_keys():
        head = key.split(".")[0]
        if head != section:
            section = head
            lines.append(f"  {head}:")
        default = OmegaConf.select(schema, key)
        choices = CHOICES.get(key)
        lines.append(f"    {key} = {default}" + (f"   ({' | '.join(choices)})" if choices else ""))
    lines.append("    parallel.deepspeed.* = raw DeepSpeed config keys, merged last")
    return "\n".join(lines)


def _check_keys(cfg: DictConfig, source: str) -> None:
    valid = set(_schema_keys())
    sections = {k.split(".")[0] for k in valid} | {k.rsplit(".", 1)[0] for k in valid}
    for key in _flatten(cfg):
        if key in valid or key == "parallel.deepspeed" or key.startswith(("data.train", "data.valid",
                                                                           "parallel.deepspeed.")):
            continue
        if key in sections:
            raise ConfigError(f"config key '{key}' in {source} is a section; give its fields instead")
        near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else f"; valid sections: {sorted({k.split('.')[0] for k in valid})}"
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")


def load_config(paths: Sequence[str] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Schema <- each YAML file in order <- key=value overrides. Raises ConfigError."""
    cfg = OmegaConf.structured(ExperimentConfig)
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML file to --config")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # yaml errors carry line numbers; keep them in one line
            raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file '{path}' must be a mapping of sections (run:, model:, ...)")
        _check_keys(loaded, f"'{path}'")
        cfg = _merge(cfg, loaded, f"'{path}'")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key=value (e.g. train.max_steps=100)")
        dotted = OmegaConf.from_dotlist([ov])
        _check_keys(dotted, f"override '{ov}'")
        cfg = _merge(cfg, dotted, f"override '{ov}'")
    validate(cfg)
    return cfg


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except (ValidationError, ConfigKeyError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if "is not a ListConfig" in msg:      # a list key given one value
            msg = f"it takes a list; write {key}=[a,b] (quoted in a shell)"
        raise ConfigError(f"bad value for config key '{key}' in {source}: {msg}") from None


# DeepSpeed config keys that other config keys set (and that the rest of the framework relies on):
# refused under parallel.deepspeed, naming the key to set instead.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size and data.micro_batch_size",
    "bf16.enabled": "train.precision", "fp16.enabled": "train.precision",
    "zero_optimization.stage": "parallel.zero_stage", "data_types.grad_accum_dtype": "train.grad_accum_dtype",
    "gradient_clipping": "optim.grad_clip", "optimizer": "optim.* (lr, betas, eps, weight_decay, fused_adam)",
    "scheduler": "optim.schedule and its keys",
}


def check_deepspeed_overrides(overrides: Any) -> None:
    """parallel.deepspeed must be a mapping and must not set what other config keys set."""
    if not isinstance(overrides, (DictConfig, dict)):
        raise ConfigError(f"config key 'parallel.deepspeed' must be a mapping of DeepSpeed config keys, got "
                          f"{overrides!r}; e.g. parallel.deepspeed.bf16.immediate_grad_update=true")

    def walk(node: Any, prefix: str) -> None:
        for k in node:
            key = prefix + str(k)
            if key in OWNED_DEEPSPEED_KEYS:   # owning a key owns everything under it
                raise ConfigError(f"config key 'parallel.deepspeed.{key}' is set by {OWNED_DEEPSPEED_KEYS[key]}: "
                                  f"set that instead")
            if isinstance(node[k], (DictConfig, dict)):
                walk(node[k], key + ".")

    walk(overrides, "")


# The range of every number: (low, high, how the error states it). "> 0" excludes 0, "in [0, 1)" excludes 1.
_INF = math.inf
RANGES = {
    **{k: (1, _INF, "a positive integer") for k in (
        "model.vocab_size", "model.n_layer", "model.n_embd", "model.ctx_len", "model.se_reduction",
        "model.ffn_mult", "data.seq_len", "data.micro_batch_size", "train.max_steps", "train.log_every",
        "train.keep_last", "train.eval_batches", "train.eval_tasks_every", "train.spike_history", "train.spike_steps", "parallel.pipeline_stages", "parallel.bucket_size",
        "parallel.prefetch_bucket_size")},
    **{k: (0, _INF, ">= 0") for k in (
        "model.medium_interval", "train.global_batch_size", "train.max_tokens", "train.save_every",
        "train.eval_every", "train.eval_tasks_limit", "train.max_bad_steps", "train.spike_factor", "train.max_rollbacks", "data.num_workers", "optim.warmup_steps", "optim.lr_final",
        "optim.weight_decay", "optim.grad_clip", "parallel.timeout_minutes", "parallel.stall_timeout_s")},
    **{k: (0, _INF, "> 0") for k in ("optim.lr", "optim.eps", "train.peak_tflops")},
    **{k: (0, 1, "in [0, 1)") for k in ("optim.beta1", "optim.beta2")},
    "train.fp16_initial_scale_power": (0, 64, "in [0, 64]"),
    "optim.decay_fraction": (0, 1, "in [0, 1]"),
    "parallel.zero_stage": (0, 3, "0, 1, 2 or 3"),
}
OPTIONAL_NUMBERS = {"train.peak_tflops"}


def validate(cfg: DictConfig) -> None:
    """Each key on its own (choices, signs); the rules that span several keys are pretrain/plan.py's."""
    check_deepspeed_overrides(cfg.parallel.deepspeed)
    if cfg.train.async_save and OmegaConf.select(cfg, "parallel.deepspeed.checkpoint.writer") is not None:
        raise ConfigError("train.async_save=true writes checkpoints through DeepSpeed's default checkpoint engine; "
                          "remove parallel.deepspeed.checkpoint.writer or set train.async_save=false")
    for key, choices in CHOICES.items():
        if choices is None:
            continue
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is '{value}'; choose one of {', '.join(choices)}")
    for key, (low, high, what) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in OPTIONAL_NUMBERS:
            continue
        if not math.isfinite(value) or not low <= value <= high or (what == "> 0" and value == low) \
                or (what.endswith("1)") and value == high):
            raise ConfigError(f"config key '{key}' must be {what}, got {value}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def model_fields(cfg: DictConfig) -> Dict[str, Any]:
    """The model section's RRWKVConfig fields (without how to run it: cuda_kernel, compile, ...)."""
    return {k: cfg.model[k] for k in MODEL_FIELDS}


def model_config(cfg: DictConfig) -> RRWKVConfig:
    return RRWKVConfig(**model_fields(cfg))
