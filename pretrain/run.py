"""The steps of a training run that launch/pretrain.py composes: config, processes, data, model, run files."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import write_atomic
from .config import ConfigError, to_yaml
from .distributed import Dist, init_distributed
from .metrics import run_metadata
from .model import RRWKVConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(RRWKVConfig))


class UserError(Exception):
    """Raised for problems the user can fix; printed as one line without a traceback."""


def init(cfg: DictConfig) -> Dist:
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
    say(d, f"{d.world_size} process(es) on {d.device.type} started; preparing data and model")
    return d


# ---- data ----

@dataclass
class DataSources:
    train: Any                      # what TokenStream takes: a path or [(path, weight), ...]
    valid: Any
    vocab_size: int
    eos_id: int
    tokenizer: Optional[str]


def _manifest(path: str, key: str):
    from .data import load_manifest
    try:
        return load_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{key}: {e}") from None


def _sources(value: Any, key: str) -> Tuple[Any, list]:
    """(TokenStream source, manifests) for a config value: a path or a list of {path, weight}."""
    if isinstance(value, (str, Path)):
        m = _manifest(str(value), key)
        return str(m.path), [m]
    items = OmegaConf.to_container(value) if not isinstance(value, list) else value
    if not isinstance(items, list) or not items:
        raise UserError(f"{key} must be a path or a list of {{path: ..., weight: ...}}")
    src, manifests = [], []
    for it in items:
        if not isinstance(it, dict) or "path" not in it:
            raise UserError(f"{key}: each entry must be {{path: ..., weight: ...}}, got {it!r}")
        m = _manifest(str(it["path"]), key)
        src.append((str(m.path), float(it.get("weight", 1.0))))
        manifests.append(m)
    return src, manifests


def prepare_data(cfg: DictConfig, d: Dist) -> DataSources:
    """Resolve data.train / data.valid (building the built-in corpus once) and check the tokenizer."""
    train, valid = cfg.data.train, cfg.data.valid
    if train == "builtin":
        from rrwkv.data_tools.builtin import prepare_builtin_corpus
        corpus = prepare_builtin_corpus(cfg.data.cache_dir, vocab_size=cfg.model.vocab_size,
                                        say=lambda text: say(d, text))
        train = corpus.train
        valid = corpus.valid if valid in (None, "builtin") else valid
        cfg.data.train, cfg.data.valid = str(train), str(valid)   # the resolved config names real paths
    train_src, manifests = _sources(train, "data.train")
    if valid == "builtin":
        raise UserError("data.valid=builtin is the validation split of data.train=builtin; give data.valid a "
                        "shard directory of your own (or null)")
    valid_src = None
    if valid:
        valid_src, vm = _sources(valid, "data.valid")
        manifests += vm
    from .data import check_tokenizer
    first = manifests[0]
    for m in manifests:  # every source made with the same tokenizer, fitting the model's vocabulary
        try:
            check_tokenizer(m, first.tokenizer_path, vocab_size=cfg.model.vocab_size)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
    return DataSources(train_src, valid_src, first.vocab_size, first.eos_id, str(first.tokenizer_path))


def train_batches(cfg: DictConfig, src: DataSources, layout):
    """This data-parallel rank's lanes of every global batch (pretrain/lanes.py)."""
    from .lanes import LaneBatches
    return LaneBatches(src.train, cfg.data.seq_len, layout.micro_batch_size, layout.grad_accum, layout.dp_rank,
                       layout.data_parallel, seed=cfg.run.seed)


def valid_batches(cfg: DictConfig, src: DataSources, layout):
    """The first train.eval_batches batches of this rank's part of data.valid (the same every time)."""
    from .data import TokenStream
    stream = TokenStream(src.valid, cfg.data.seq_len, cfg.data.micro_batch_size, rank=layout.dp_rank,
                         world_size=layout.data_parallel, num_workers=cfg.data.num_workers, seed=0, max_epochs=1)
    return itertools.islice(iter(stream), cfg.train.eval_batches)


# ---- model ----

def model_fields(cfg: DictConfig) -> Dict[str, Any]:
    return {k: cfg.model[k] for k in MODEL_FIELDS}


def model_config(cfg: DictConfig):
    from .model import RRWKVConfig
    return RRWKVConfig(**model_fields(cfg))


def data_parallel_size(cfg: DictConfig, d: Dist) -> int:
    stages = cfg.parallel.pipeline_stages
    if d.world_size % stages:
        raise ConfigError(f"parallel.pipeline_stages ({stages}) must divide the number of processes ({d.world_size})")
    return d.world_size // stages


def build_model(cfg: DictConfig, d: Dist):
    """RRWKV, or with parallel.pipeline_stages > 1 its PipelineModule; and this rank's data-parallel rank."""
    if cfg.parallel.pipeline_stages > 1:
        from .pipeline import data_parallel_rank, pipeline_model
        if cfg.run.init_from:
            raise ConfigError("run.init_from is not supported with parallel.pipeline_stages > 1 yet; fine-tune "
                              "without pipeline stages")
        pipe = pipeline_model(model_config(cfg), cfg.parallel.pipeline_stages, cfg.run.seed,
                              cfg.train.activation_checkpointing, cfg.parallel.partition_method, cfg.train.l2wrap)
        maybe_compile(cfg, pipe, d)
        return pipe, data_parallel_rank(pipe)
    from .model import RRWKV
    weights = read_weights(model_config(cfg), Path(cfg.run.init_from)) if cfg.run.init_from else None
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init:
        model = build_partitioned(cfg, d, weights)
    else:
        model = RRWKV(model_config(cfg), init_seed=cfg.run.seed)
        if weights is not None:
            model.load_state_dict(weights, strict=True)
    model.gradient_checkpointing = bool(cfg.train.activation_checkpointing)
    maybe_compile(cfg, model, d)
    return model, d.rank


def maybe_compile(cfg: DictConfig, model, d: Dist) -> None:
    """model.compile: every block through torch.compile as one graph, WKV op included (compiled at the first step)."""
    if cfg.model.compile:
        from .compile import compile_blocks
        n = compile_blocks(model)
        say(d, f"model.compile: {n} blocks{' on this stage' if cfg.parallel.pipeline_stages > 1 else ''} run compiled, "
               f"WKV op included (torch {torch.__version__}; compiled during the first step)")


def build_partitioned(cfg: DictConfig, d: Dist, weights: Optional[Dict[str, torch.Tensor]] = None):
    """RRWKV created under ZeRO-3's zero.Init: every parameter is partitioned over the ranks as it is
    made, so no process ever holds the whole model (what 7B/14B need). Each part is then gathered,
    initialized with the same per-layer seeds as RRWKV(init_seed=...) (or given `weights`, by
    name) and partitioned again."""
    import deepspeed

    from .engine import batch_layout, deepspeed_config
    from .model import RRWKV
    ds = deepspeed_config(cfg, batch_layout(cfg, data_parallel_size(cfg, d), d.rank), d.device)
    with deepspeed.zero.Init(config_dict_or_path=ds):
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


def load_weights(model, model_dir: Path) -> None:
    """Weights of an exported MODEL_DIR (model.safetensors + config.json) into `model`."""
    model.load_state_dict(read_weights(model.cfg, model_dir), strict=True)


def read_weights(model_cfg, model_dir: Path) -> Dict[str, torch.Tensor]:
    """The float32 state dict of an exported MODEL_DIR, checked against `model_cfg` (an RRWKVConfig)."""
    from safetensors.torch import load_file

    from .model import RRWKV
    cfg_file, weights = model_dir / "config.json", model_dir / "model.safetensors"
    if not weights.is_file() or not cfg_file.is_file():
        raise UserError(f"run.init_from={model_dir}: expected model.safetensors and config.json there "
                        f"(make one with launch/export.py)")
    saved = json.loads(cfg_file.read_text())
    mine = model_cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        raise UserError(f"run.init_from={model_dir} has a different model shape {diff} (saved, config); "
                        f"set model.* to match it")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    with torch.device("meta"):
        expected = set(RRWKV(model_cfg, init_seed=None).state_dict())
    if set(state) != expected:
        raise UserError(f"run.init_from={model_dir}: model.safetensors has parameters {sorted(set(state) ^ expected)[:4]} "
                        f"that do not match the model; export it again with launch/export.py")
    return state


# ---- run files and odds ----

def write_run_files(cfg: DictConfig, out_dir: Path, d: Dist, resumed_at: int,
                    deepspeed: Optional[Dict] = None) -> None:
    """config.yaml, the DeepSpeed config the engine was given (deepspeed_config.json) and a line of
    runs.jsonl per start."""
    if not d.is_main:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", to_yaml(cfg))
    if deepspeed is not None:
        write_atomic(out_dir / "deepspeed_config.json", json.dumps(deepspeed, indent=1) + "\n")
    meta = dict(run_metadata(ROOT), world_size=d.world_size, device=str(d.device), resumed_at_step=resumed_at,
                argv=sys.argv)
    with (out_dir / "runs.jsonl").open("a") as f:     # one line per start (first run and every resume)
        f.write(json.dumps(meta) + "\n")


def say(d: Dist, text: str, err: bool = False) -> None:
    if d.is_main:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def announce(cfg: DictConfig, d: Dist, layout, flops: float, peak_name: str, resume_dir, step: int) -> None:
    from .metrics import count_params
    n = count_params(model_config(cfg))
    say(d, f"model: {n / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP/token; MFU against {peak_name}; "
           f"{d.world_size} rank(s) on {d.device.type} ({layout.data_parallel} data-parallel x "
           f"{cfg.parallel.pipeline_stages} pipeline stages, ZeRO-{cfg.parallel.zero_stage}); global batch "
           f"{layout.global_batch_size} x {cfg.data.seq_len} tokens ({layout.grad_accum} accumulation steps); "
           + (f"resumed from {resume_dir} at step {step}" if step else "fresh start"))


def mark_requeue(out_dir: Path, d: Dist, step: int) -> None:
    """OUT_DIR/REQUEUE: this run stopped on a signal after saving step `step`; start it again."""
    if d.is_main:
        write_atomic(out_dir / "REQUEUE", json.dumps({"step": step}) + "\n")
        print(f"stopped on signal after saving step {step}; wrote {out_dir / 'REQUEUE'}", flush=True)


def mark_done(out_dir: Path, d: Dist) -> None:
    if d.is_main:
        (out_dir / "REQUEUE").unlink(missing_ok=True)


def memory_stats(device: torch.device) -> Dict[str, float]:
    """Peak memory: on a GPU the peak allocated (`mem_gb`) and reserved (`mem_reserved_gb`) by the
    caching allocator, and `alloc_retries`, how often it found no free block, freed its cache (a
    device synchronization) and tried again: above 0 the card is full or fragmented and steps slow
    down (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True or a smaller micro-batch help).
    On a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return {"mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2 ** 30,
                "alloc_retries": int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))}
    try:
        import resource
        return {"mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    except ImportError:
        return {}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def shutdown() -> None:
    """Leave the process group cleanly (its threads otherwise abort the interpreter at exit)."""
    import torch.distributed as tdist
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def run_main(main, argv) -> int:
    """Run `main`, turning user errors into one line on stderr and exit status 2."""
    try:
        code = main(argv) or 0
        shutdown()
        return code
    except (ConfigError, UserError, FileNotFoundError, FileExistsError, ValueError) as e:
        if isinstance(e, ValueError) and not isinstance(e, ConfigError) and os.environ.get("RRWKV_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
