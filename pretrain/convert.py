"""RWKV-4 weights in and out: BlinkDL's `.pth` files and Hugging Face `RwkvForCausalLM` directories.
(Models of any medium interval go to and from Hugging Face as remote code: pretrain/hf/convert.py.)

An RRWKV with medium_interval 0 is RWKV-4 (rrwkv.md), and its state dict names are BlinkDL's:
`emb.weight`, `blocks.N.ln0/ln1/ln2`, `blocks.N.att.{time_decay, time_first, time_mix_k, time_mix_v,
time_mix_r, key, value, receptance, output}`, `blocks.N.ffn.{time_mix_k, time_mix_r, key,
receptance, value}`, `ln_out`, `head.weight`; time_decay and time_first are the raw parameters
(the decay per step is exp(-exp(time_decay))), mixes are (1, 1, C). Hugging Face's RwkvForCausalLM
keeps the same tensors and shapes under other names (`rwkv.embeddings`, `rwkv.blocks.N.pre_ln`,
`attention`, `feed_forward`, `time_mix_key`, ...); `hf_name` maps them.

Hugging Face's model halves its hidden state every `rescale_every` layers at inference (with the
matching weights scaled in memory); that is RWKV-4 only up to LayerNorm's epsilon, so exported
configs set rescale_every 0 and imported weights are the stored (unscaled) ones.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .export import CONFIG, TOKENIZER_NAMES, find_tokenizer, load_config, save_model_dir
from .errors import UserError
from .weights import load_tensors, read_weights, save_tensors

HF_RENAMES = [  # (ours, Hugging Face's), applied to name parts in order
    ("emb.", "embeddings."), ("ln0.", "pre_ln."), ("att.", "attention."), ("ffn.", "feed_forward."),
    ("time_mix_k", "time_mix_key"), ("time_mix_v", "time_mix_value"), ("time_mix_r", "time_mix_receptance"),
]


def hf_name(name: str) -> str:
    """Our (BlinkDL's) parameter name -> RwkvForCausalLM's."""
    if name == "head.weight":
        return name
    for ours, theirs in HF_RENAMES:
        name = name.replace(ours, theirs)
    return "rwkv." + name


def our_name(name: str) -> str:
    """RwkvForCausalLM's parameter name -> ours."""
    if name == "head.weight":
        return name
    if not name.startswith("rwkv."):
        raise KeyError(name)
    name = name[len("rwkv."):]
    for ours, theirs in reversed(HF_RENAMES):
        name = name.replace(theirs, ours)
    return name


def rwkv4_config(state: Dict[str, torch.Tensor], ctx_len: int, source: Path) -> dict:
    """RRWKVConfig fields (interval 0) of an RWKV-4 state dict in our names."""
    if not {"emb.weight", "head.weight", "blocks.0.ffn.key.weight"} <= set(state):
        raise UserError(f"{source} is not an RWKV-4 model: it has no emb.weight / head.weight / blocks.0 "
                        f"(RWKV-5/6/7 and other layouts are not supported)")
    vocab, C = state["emb.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state["blocks.0.ffn.key.weight"].shape[0]
    if hidden % C:
        raise UserError(f"{source}: channel-mix width {hidden} is not a multiple of n_embd {C}; RRWKV needs "
                        f"ffn_mult * n_embd")
    return {"vocab_size": int(vocab), "n_layer": layers, "n_embd": int(C), "ctx_len": int(ctx_len),
            "medium_interval": 0, "se_reduction": 16, "ffn_mult": hidden // C}


def _check_rwkv4_names(state: Dict[str, torch.Tensor], config: dict, source: Path) -> None:
    from .model import RRWKV, RRWKVConfig
    expected = RRWKV(RRWKVConfig.from_dict(config)).state_dict()
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if extra or missing:
        raise UserError(f"{source} does not have RWKV-4's tensors: unexpected {extra[:4]}, missing {missing[:4]} "
                        f"(only RWKV-4 checkpoints convert)")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            if state[k].numel() == v.numel():           # e.g. mixes stored as (C,) instead of (1, 1, C)
                state[k] = state[k].reshape(v.shape)
            else:
                raise UserError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")


def _tokenizer(explicit: Optional[str], beside: Path, what: str) -> Path:
    if explicit:
        return Path(explicit)
    for name in TOKENIZER_NAMES + ("20B_tokenizer.json",):
        if (beside / name).is_file():
            return beside / name
    raise UserError(f"no tokenizer.json or tokenizer.model in {beside}; pass --tokenizer PATH (the tokenizer "
                    f"{what} was trained with, e.g. 20B_tokenizer.json for the RWKV-4 Pile models)")


def from_rwkv4_pth(path: Path, output: Path, tokenizer: Optional[str] = None, ctx_len: int = 1024,
                   dtype: str = "fp32") -> dict:
    """BlinkDL's RWKV-4 `.pth` (a plain state dict) -> MODEL_DIR with medium_interval 0."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file; pass an RWKV-4 .pth checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, truncated files
        raise UserError(f"--input {path} could not be read as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--input {path} holds a {type(state).__name__}, not a state dict; pass an RWKV-4 .pth")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    config = rwkv4_config(state, ctx_len, path)
    _check_rwkv4_names(state, config, path)
    save_model_dir({k: v.float() for k, v in state.items()}, config, _tokenizer(tokenizer, path.parent, str(path)),
                   output, dtype, {"source": str(path.resolve()), "converted_from": "rwkv4-pth"})
    return config


def _read_hf_weights(hf_dir: Path) -> Dict[str, torch.Tensor]:
    files = []
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif (hf_dir / "model.safetensors.index.json").is_file():
        index = _read_json(hf_dir / "model.safetensors.index.json")
        files = [hf_dir / f for f in sorted(set(index.get("weight_map", {}).values()))]
    elif (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code, truncated files
            raise UserError(f"{hf_dir / 'pytorch_model.bin'} could not be read as a PyTorch state dict "
                            f"({type(e).__name__}: {e})") from None
    if not files:
        raise UserError(f"--input {hf_dir}: no model.safetensors (or index, or pytorch_model.bin) there; "
                        f"pass a directory written by RwkvForCausalLM.save_pretrained")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_tensors(f))
    return state


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({e}); pass a directory written by RwkvForCausalLM.save_pretrained") \
            from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no JSON object; pass a directory written by RwkvForCausalLM.save_pretrained")
    return data


def from_hf_rwkv(hf_dir: Path, output: Path, tokenizer: Optional[str] = None, dtype: str = "fp32") -> dict:
    """A Hugging Face RwkvForCausalLM directory -> MODEL_DIR with medium_interval 0."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"--input {hf_dir}: no config.json there; pass a directory written by "
                        f"RwkvForCausalLM.save_pretrained")
    hf = _read_json(cfg_file)
    if hf.get("model_type") != "rwkv":
        raise UserError(f"{cfg_file} has model_type {hf.get('model_type')!r}; only RWKV-4 ('rwkv') converts")
    C = hf.get("hidden_size")
    if hf.get("attention_hidden_size") not in (None, C):
        raise UserError(f"{cfg_file}: attention_hidden_size {hf['attention_hidden_size']} differs from hidden_size "
                        f"{C}; RRWKV's time-mix is C x C")
    raw = _read_hf_weights(hf_dir)
    try:
        state = {our_name(k): v for k, v in raw.items()}
    except KeyError as e:
        raise UserError(f"{hf_dir} holds tensor {e} that RwkvForCausalLM does not have") from None
    if "head.weight" not in state and hf.get("tie_word_embeddings"):
        state["head.weight"] = state["emb.weight"]
    config = rwkv4_config(state, hf.get("context_length", 1024), hf_dir)
    _check_rwkv4_names(state, config, hf_dir)
    save_model_dir({k: v.float() for k, v in state.items()}, config, _tokenizer(tokenizer, hf_dir, str(hf_dir)),
                   output, dtype, {"source": str(hf_dir.resolve()), "converted_from": "hf-rwkv"})
    return config


def to_hf_rwkv(model_dir: Path, output: Path, dtype: str = "fp32") -> dict:
    """An interval-0 MODEL_DIR -> a directory RwkvForCausalLM.from_pretrained reads (config, safetensors, tokenizer)."""
    from .export import DTYPES
    model_dir = Path(model_dir)
    cfg = load_config(model_dir, flag="--input")
    if cfg.medium_interval != 0:
        raise UserError(f"{model_dir / CONFIG} has medium_interval {cfg.medium_interval}: only interval-0 (RWKV-4) "
                        f"models convert to RwkvForCausalLM, which has no mediums; use --to hf-rrwkv (any interval)")
    tok_path = find_tokenizer(model_dir)
    from rrwkv.data_tools.tokenizer import load_tokenizer
    eos = load_tokenizer(tok_path).eos_id
    state = read_weights(cfg, model_dir)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory to write the Hugging Face model into")
    output.mkdir(parents=True, exist_ok=True)
    save_tensors({hf_name(k): v.to(DTYPES[dtype]).contiguous() for k, v in state.items()},
                 output / "model.safetensors", {"format": "pt"})
    hf = {"architectures": ["RwkvForCausalLM"], "model_type": "rwkv", "vocab_size": cfg.vocab_size,
          "context_length": cfg.ctx_len, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
          "attention_hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_mult * cfg.n_embd,
          "layer_norm_epsilon": 1e-5, "bos_token_id": eos, "eos_token_id": eos, "rescale_every": 0,
          "tie_word_embeddings": False, "use_cache": True,
          "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]}
    (output / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (output / tok_path.name).write_bytes(tok_path.read_bytes())
    return hf


def describe(config: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in config.items())


def convert(direction: Tuple[Optional[str], Optional[str]], src: Path, out: Path, tokenizer: Optional[str],
            ctx_len: int, dtype: Optional[str]) -> dict:
    """Run one conversion. dtype None: the stored dtype for hf-rrwkv (a round trip is bit for bit), else fp32."""
    frm, to = direction
    if "hf-rrwkv" in direction and tokenizer:
        raise UserError("--tokenizer is not used with hf-rrwkv: the tokenizer travels inside the folders; leave it out")
    if frm == "hf-rrwkv" and to is None:
        from .hf.convert import from_hf_rrwkv
        return from_hf_rrwkv(src, out, dtype)
    if to == "hf-rrwkv" and frm is None:
        from .hf.convert import to_hf_rrwkv
        return to_hf_rrwkv(src, out, dtype)
    dtype = dtype or "fp32"
    if frm == "hf-rwkv" and to is None:
        return from_hf_rwkv(src, out, tokenizer, dtype)
    if frm == "rwkv4-pth" and to is None:
        return from_rwkv4_pth(src, out, tokenizer, ctx_len, dtype)
    if to == "hf-rwkv" and frm is None:
        return to_hf_rwkv(src, out, dtype)
    raise UserError("give exactly one of --from hf-rwkv | --from rwkv4-pth | --from hf-rrwkv (into a MODEL_DIR) or "
                    "--to hf-rwkv (from an interval-0 MODEL_DIR) | --to hf-rrwkv (from any MODEL_DIR)")
