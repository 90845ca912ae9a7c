"""Reading and writing an exported MODEL_DIR's weights (model.safetensors + config.json): for inference,
conversion and `run.init_from` alike. Imports nothing of the trainer."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from .errors import UserError


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process umask (tempfile and safetensors give 0o600)."""
    try:  # Linux: read the umask without setting it (os.umask sets it, for a moment, for every thread)
        umask = int(Path("/proc/self/status").read_text().split("Umask:")[1].split()[0], 8)
    except (OSError, IndexError, ValueError):
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


def save_tensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' save_file (a temporary file renamed over `path`), leaving `path` the mode of a new file."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode())


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a truncated or foreign file is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} could not be read ({e}); it is truncated or not a safetensors file: "
                        f"copy or export it again") from None


def tensors_metadata(path: Path) -> Dict[str, str]:
    """The metadata in a .safetensors file's header (export records the source and the tokenizer there)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} could not be read ({e}); it is truncated or not a safetensors file: "
                        f"copy or export it again") from None


def shape_mismatch(expected: Dict[str, tuple], got: Dict[str, tuple]) -> str:
    """How the {name: shape} of some weights differ from a config's, for an error message ('' if they agree)."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {extra[:4]}"] if extra else []) + \
        [f"tensor {k} has shape {got[k]} where the config needs {expected[k]}" for k in wrong[:2]]
    if len(wrong) > 2:
        parts.append(f"{len(wrong) - 2} more tensors of another shape")
    return "; ".join(parts)


def expected_shapes(model_cfg) -> Dict[str, tuple]:
    """{name: shape} of the state dict of an RRWKV of `model_cfg` (built on the meta device: no memory)."""
    from .model import RRWKV
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in RRWKV(model_cfg, init_seed=None).state_dict().items()}


def load_weights(model, model_dir: Path) -> None:
    """Weights of an exported MODEL_DIR (model.safetensors + config.json) into `model`."""
    model.load_state_dict(read_weights(model.cfg, model_dir), strict=True)


def read_weights(model_cfg, model_dir: Path) -> Dict[str, torch.Tensor]:
    """The float32 state dict of an exported MODEL_DIR, checked against `model_cfg` (an RRWKVConfig)."""
    cfg_file, weights = model_dir / "config.json", model_dir / "model.safetensors"
    if not weights.is_file() or not cfg_file.is_file():
        raise UserError(f"run.init_from={model_dir}: expected model.safetensors and config.json there "
                        f"(make one with launch/export.py)")
    try:
        saved = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file} is not an RRWKV config ({e}); export the model again") from None
    mine = model_cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        raise UserError(f"run.init_from={model_dir} has a different model shape {diff} (saved, config); "
                        f"set model.* to match it")
    state = {k: v.float() for k, v in load_tensors(weights).items()}
    wrong = shape_mismatch(expected_shapes(model_cfg), {k: tuple(v.shape) for k, v in state.items()})
    if wrong:
        raise UserError(f"{weights} does not fit {cfg_file} ({wrong}): they come from different models; "
                        f"export the model again (or put its own config.json back)")
    return state
