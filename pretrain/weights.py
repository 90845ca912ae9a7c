"""Reading an exported MODEL_DIR's weights (model.safetensors + config.json): for inference, conversion
and `run.init_from` alike. Imports nothing of the trainer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from .errors import UserError


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
