"""Training checkpoints to MODEL_DIRs, and MODEL_DIRs back to models.

A MODEL_DIR (interfaces.md, "After training") holds `model.safetensors`, `config.json` (the
RRWKVConfig fields) and the tokenizer (`tokenizer.model` or `tokenizer.json`), whose sha256 the
safetensors metadata records (`tokenizer_sha256`; loading checks it).

Checkpoint layouts, told apart by their files in OUT_DIR/checkpoints/step<N>:
- ZeRO 1/2/3 (`*_optim_states.pt`): the fp32 master weights, gathered from every rank's partition
  by DeepSpeed's own zero_to_fp32 (so a trained fp32 model is exported bit for bit).
- ZeRO 0 without a ZeRO optimizer (`mp_rank_00_model_states.pt` only): the module state dict.
- Pipeline (`layer_XX-model_states.pt`): each layer's module state, renamed to RRWKV's names.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .checkpoint import TAG_RE
from .errors import UserError
from .weights import expected_shapes, load_weights, save_tensors, shape_mismatch, tensors_metadata

WEIGHTS, CONFIG = "model.safetensors", "config.json"
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- reading a training checkpoint ----

def find_tag_dir(checkpoint: Path, tag: Optional[str] = None) -> Path:
    """The step<N> directory to export: from OUT_DIR, OUT_DIR/checkpoints or a tag directory."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise UserError(f"--checkpoint {checkpoint}: no such directory; pass a training run's OUT_DIR "
                        f"(the run.out_dir it was trained with)")
    if TAG_RE.match(checkpoint.name) and checkpoint.is_dir() and tag is None:
        return checkpoint
    if not checkpoint.is_dir():
        raise UserError(f"--checkpoint {checkpoint} is a file; pass a training run's OUT_DIR")
    ckpt_dir = checkpoint / "checkpoints" if (checkpoint / "checkpoints").is_dir() else checkpoint
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise UserError(f"--checkpoint {checkpoint}: no checkpoint found (expected {ckpt_dir / 'latest'}); "
                            f"pass a training run's OUT_DIR after it has saved a checkpoint")
        tag = latest.read_bytes().decode(errors="replace").strip()
        if not TAG_RE.match(tag):
            raise UserError(f"{latest} names {tag[:40]!r}, not a step<N> checkpoint (it is damaged); "
                            f"pick one with --tag (tags present: {tags or 'none'})")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise UserError(f"checkpoint {tag_dir} not found; tags present: {tags or 'none'}")
    return tag_dir


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint file {path} could not be read ({type(e).__name__}: {e}); "
                        f"it is incomplete or corrupt: export an earlier tag with --tag step<N>") from None


def client_state(tag_dir: Path) -> dict:
    """What rank 0 saved beside the weights: model_config, step, tokens (pretrain/checkpoint.py)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            sd = _torch_load(tag_dir / name)
            return {k: sd[k] for k in ("model_config", "step", "tokens", "ds_version", "world_size") if k in sd}
    return {}


LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


def pipeline_state_dict(tag_dir: Path, layer_files) -> Dict[str, torch.Tensor]:
    """Weights of a DeepSpeed PipelineModule checkpoint, by RRWKV parameter name.

    pretrain/pipeline.py lays the model out as layer 0 = embedding, layers 1..n_layer = blocks,
    layer n_layer+1 = ln_out and head; DeepSpeed saves one layer_XX-model_states.pt per layer with
    that layer's own state dict. These are the module weights as the run used them (in a bf16 run,
    the bf16 weights; the fp32 masters stay in the optimizer files).
    """
    by_index = {int(LAYER_FILE.match(f.name).group(1)): f for f in layer_files if LAYER_FILE.match(f.name)}
    n = len(by_index)
    if sorted(by_index) != list(range(n)) or n < 3:
        raise UserError(f"pipeline checkpoint {tag_dir} has layer files {sorted(by_index)}; expected layer_00 .. "
                        f"layer_NN without gaps (a stage's files missing?): export an earlier tag with --tag")
    state: Dict[str, torch.Tensor] = {}
    for i, f in sorted(by_index.items()):
        prefix = f"blocks.{i - 1}." if 0 < i < n - 1 else ""
        for k, v in _torch_load(f).items():
            state[prefix + k] = v.float()
    return state


def checkpoint_state_dict(tag_dir: Path) -> Dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint tag directory, by RRWKV parameter name."""
    layer_files = sorted(tag_dir.glob("layer_*-model_states.pt"))
    if layer_files:
        return pipeline_state_dict(tag_dir, layer_files)
    if list(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        return bf16_optimizer_state_dict(tag_dir)
    if list(tag_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            with contextlib.redirect_stdout(sys.stderr):   # it reports its progress on stdout
                sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {tag_dir} could not be gathered by DeepSpeed's zero_to_fp32 ({e}); "
                            f"it is incomplete (a rank's files missing?): export an earlier tag with --tag") from None
        return {k: v.float() for k, v in sd.items()}
    single = tag_dir / "mp_rank_00_model_states.pt"
    if single.is_file():
        saved = _torch_load(single)
        if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
            raise UserError(f"checkpoint file {single} holds no `module` state dict; it is not a DeepSpeed "
                            f"checkpoint: export another tag with --tag step<N>")
        return {k: v.float() for k, v in saved["module"].items()}
    raise UserError(f"checkpoint {tag_dir} holds no DeepSpeed model files (*_model_states.pt); "
                    f"pass a training run's OUT_DIR or one of its checkpoints/step<N> directories")


def bf16_optimizer_state_dict(tag_dir: Path) -> Dict[str, torch.Tensor]:
    """fp32 master weights of a bf16 run with ZeRO 0/1 (DeepSpeed's BF16_Optimizer).

    Its files hold the same flat fp32 partitions as ZeRO-1/2 but no `zero_stage` entry, which
    get_fp32_state_dict_from_zero_checkpoint needs; DeepSpeed's own ZeRO-2 merge reassembles them.
    """
    from deepspeed.utils import zero_to_fp32 as z
    files = sorted(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"),
                   key=lambda p: int(re.search(r"rank_(\d+)_", p.name).group(1)))
    states = [_torch_load(f)["optimizer_state_dict"] for f in files]
    counts = states[0]["partition_count"]
    world = max(counts) if isinstance(counts, list) else counts
    if world != len(files):
        raise UserError(f"checkpoint {tag_dir} was written by {world} ranks but holds {len(files)} optimizer files; "
                        f"it is incomplete: export an earlier tag with --tag")
    with contextlib.redirect_stdout(sys.stderr):
        models = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
        sd = z._get_fp32_state_dict_from_zero2_checkpoint(
            world, [s["single_partition_of_fp32_groups"] for s in states], models, False, None)
    return {k: v.float() for k, v in sd.items()}


def run_tokenizer(out_dir: Path) -> Path:
    """The tokenizer a run was trained with: OUT_DIR/config.yaml -> data.train manifest -> tokenizer."""
    from omegaconf import OmegaConf

    from .data import load_manifest
    cfg_file = out_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file} not found, so the run's tokenizer is unknown; pass --tokenizer PATH")
    train = OmegaConf.load(cfg_file).data.train
    first = train if isinstance(train, str) else OmegaConf.to_container(train)[0]["path"]
    try:
        return load_manifest(first, check_files=False).tokenizer_path
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"the tokenizer of the run in {out_dir} could not be found through data.train ({e}); "
                        f"pass --tokenizer PATH") from None


# ---- writing and reading MODEL_DIRs ----

def save_model_dir(state: Dict[str, torch.Tensor], config: dict, tokenizer: Optional[Path], output: Path,
                   dtype: str = "fp32", metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write model.safetensors (in `dtype`), config.json and the tokenizer file to `output`.

    The safetensors metadata records the tokenizer's sha256, so a MODEL_DIR's tokenizer can be checked.
    """
    from rrwkv.data_tools.tokenizer import file_sha256

    from .model import RRWKVConfig
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    cfg = RRWKVConfig.from_dict(dict(config))
    wrong = shape_mismatch(expected_shapes(cfg), {k: tuple(v.shape) for k, v in state.items()})
    if wrong:
        raise UserError(f"the weights do not fit model {cfg.to_dict()}: {wrong}")
    metadata = {"format": "pt", **(metadata or {})}
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise UserError(f"tokenizer {tokenizer} not found; pass --tokenizer PATH (a sentencepiece .model "
                            f"or a Hugging Face tokenizer.json)")
        metadata["tokenizer_sha256"] = file_sha256(tokenizer)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory to write the MODEL_DIR into")
    output.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_tensors(tensors, output / WEIGHTS, metadata)
    (output / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        name = "tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model"
        for other in TOKENIZER_NAMES:       # one tokenizer per MODEL_DIR
            if other != name and (output / other).exists():
                (output / other).unlink()
        shutil.copyfile(tokenizer, output / name)
    return output


def export_checkpoint(checkpoint: Path, output: Path, dtype: str = "fp32", tag: Optional[str] = None,
                      tokenizer: Optional[Path] = None) -> Tuple[Path, dict]:
    """Export a training run's checkpoint to a MODEL_DIR; returns (MODEL_DIR, what was exported)."""
    tag_dir = find_tag_dir(checkpoint, tag)
    out_dir = tag_dir.parent.parent                     # OUT_DIR/checkpoints/step<N>
    state = checkpoint_state_dict(tag_dir)
    client = client_state(tag_dir)
    config = client.get("model_config")
    if config is None:                                   # checkpoints from before model_config was saved
        from omegaconf import OmegaConf

        from .model import RRWKVConfig
        if not (out_dir / "config.yaml").is_file():
            raise UserError(f"checkpoint {tag_dir} does not record its model shape and {out_dir / 'config.yaml'} "
                            f"is missing; export from the run's OUT_DIR")
        model = OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml").model)
        config = {k: model[k] for k in RRWKVConfig().to_dict()}
    tok = Path(tokenizer) if tokenizer else run_tokenizer(out_dir)
    meta = {"source": str(tag_dir.resolve()), "step": str(client.get("step", "")),
            "tokens": str(client.get("tokens", "")), "dtype": dtype}
    save_model_dir(state, config, tok, output, dtype, meta)
    return Path(output), {"tag_dir": tag_dir, "config": config, "tokenizer": tok, "step": client.get("step")}


def find_tokenizer(model_dir: Path) -> Path:
    for name in TOKENIZER_NAMES:
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    raise UserError(f"{model_dir} holds no tokenizer.model or tokenizer.json; export it again with "
                    f"launch/export.py (or copy the run's tokenizer there)")


def load_config(model_dir: Path, flag: str = "--model"):
    from .model import RRWKVConfig
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).is_file() or not (model_dir / WEIGHTS).is_file():
        raise UserError(f"{flag} {model_dir}: expected {WEIGHTS} and {CONFIG} there (make a MODEL_DIR with "
                        f"launch/export.py or launch/convert.py)")
    try:
        return RRWKVConfig.from_dict(json.loads((model_dir / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise UserError(f"{model_dir / CONFIG} is not an RRWKV config ({e}); export the model again") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The RRWKV of a MODEL_DIR, in eval mode on `device` in `dtype` (the weights are read as fp32 first)."""
    from .model import RRWKV
    model_dir = Path(model_dir)
    model = RRWKV(load_config(model_dir))
    load_weights(model, model_dir)       # load_config checked the files and built the model from them
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(model_dir: Path):
    """The tokenizer of a MODEL_DIR, checked to be the one exported with the model (or at least to fit it)."""
    from rrwkv.data_tools.tokenizer import load_tokenizer as load
    model_dir = Path(model_dir)
    tok = load(find_tokenizer(model_dir))
    vocab = load_config(model_dir).vocab_size
    recorded = tensors_metadata(model_dir / WEIGHTS).get("tokenizer_sha256")
    if recorded and recorded != tok.sha256:
        raise UserError(f"{tok.path} is not the tokenizer the model was exported with (its sha256 {tok.sha256[:12]}, "
                        f"{model_dir / WEIGHTS} records {recorded[:12]}); put that tokenizer back there")
    if tok.vocab_size > vocab:
        raise UserError(f"{tok.path} has {tok.vocab_size} tokens but the model only {vocab} ({model_dir / CONFIG} "
                        f"vocab_size): it is not the tokenizer the model was trained with; put that one back there")
    return tok


def parse_dtype(name: str) -> torch.dtype:
    names = dict(DTYPES, fp64=torch.float64)
    if name not in names:
        raise UserError(f"--dtype {name}: choose one of {', '.join(names)}")
    return names[name]

