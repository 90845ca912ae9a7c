"""MODEL_DIR <-> HF_DIR: any RRWKV as a Hugging Face `transformers` model with remote code, and back.

An HF_DIR (huggingface_hub's layout, ready to upload) holds:
- `config.json`: model_type `rrwkv`, the RRWKVConfig fields under their own names, `auto_map` naming the
  remote code, `architectures`, the EOS id (also as BOS: a document starts after EOS), `dtype`;
- `configuration_rrwkv.py`, `modeling_rrwkv.py`: the remote code (pretrain/hf/, copied verbatim);
- `model.safetensors`: our tensors, bit for bit, under `rrwkv.<our name>` (`head.weight` as is), in the
  MODEL_DIR's dtype (or --dtype); its metadata carries the MODEL_DIR's (step, tokens, ...);
- the tokenizer for AutoTokenizer (`tokenizer.json`, `tokenizer_config.json`; a sentencepiece model is
  converted by transformers and also kept as `tokenizer.model`), `generation_config.json`;
- `README.md`: the model card (pretrain/hf/card.py), with the training config and evaluation reports
  when the MODEL_DIR has them (copied beside it).
Output directories are written under a temporary name and renamed when complete; an existing one is an error.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import UserError
from ..export import CONFIG, DTYPES, WEIGHTS, find_tokenizer, load_config, load_tokenizer, save_model_dir
from ..weights import expected_shapes, load_tensors, save_tensors, shape_mismatch, tensors_metadata
from . import card

HERE = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_rrwkv.py", "modeling_rrwkv.py")
AUTO_MAP = {"AutoConfig": "configuration_rrwkv.RRWKVConfig", "AutoModel": "modeling_rrwkv.RRWKVModel",
            "AutoModelForCausalLM": "modeling_rrwkv.RRWKVForCausalLM"}
PREFIX = "rrwkv."           # RRWKVForCausalLM.base_model_prefix
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_name(name: str) -> str:
    """Our parameter name -> RRWKVForCausalLM's."""
    return name if name == "head.weight" else PREFIX + name


def our_name(name: str) -> str:
    """RRWKVForCausalLM's parameter name -> ours (KeyError for a name it does not have)."""
    if name == "head.weight":
        return name
    if not name.startswith(PREFIX):
        raise KeyError(name)
    return name[len(PREFIX):]


def check_new(path: Path) -> Path:
    """`path` for a new output directory: it must not exist yet (an empty directory may)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--output {path} already exists; give a new directory (nothing is overwritten)")
    return path


@contextmanager
def new_directory(path: Path):
    """A temporary directory beside `path`, renamed to `path` when the block completes (removed if it fails)."""
    path = check_new(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {path}: its folder {path.parent} cannot be made ({e.strerror})") from None
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stored_dtype(tensors: Dict[str, torch.Tensor]) -> str:
    """The dtype name of a set of tensors stored in one dtype (fp32 for a mix)."""
    dtypes = {v.dtype for v in tensors.values()}
    return DTYPE_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"


def hf_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` that encodes as the MODEL_DIR's tokenizer file does: a tokenizer.json as it is,
    a sentencepiece model converted by transformers (which follows the model's own normalizer settings)."""
    from tokenizers import Tokenizer
    if path.suffix == ".json":
        return Tokenizer.from_file(str(path))
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise UserError(f"converting the sentencepiece tokenizer {path} for Hugging Face needs transformers >= 5 "
                        f"(pip install -U transformers)")
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type == 1:       # unigram: pieces with scores
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:                                        # BPE (what rrwkv-data train-tokenizer makes)
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tok is None:
        raise UserError(f"{path}: a sentencepiece model of type {proto.trainer_spec.model_type} cannot be converted "
                        f"for Hugging Face (BPE and unigram can)")
    return tok


def to_hf_rrwkv(model_dir: Path, output: Path, dtype: Optional[str] = None) -> dict:
    """A MODEL_DIR of any medium interval -> an HF_DIR that AutoModelForCausalLM loads with trust_remote_code."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from .configuration_rrwkv import RRWKVConfig as HFConfig
    model_dir = Path(model_dir)
    cfg = load_config(model_dir, flag="--input")
    check_new(output)
    tensors = load_tensors(model_dir / WEIGHTS)
    wrong = shape_mismatch(expected_shapes(cfg), {k: tuple(v.shape) for k, v in tensors.items()})
    if wrong:
        raise UserError(f"{model_dir / WEIGHTS} does not fit {model_dir / CONFIG} ({wrong}); export the model again")
    metadata = tensors_metadata(model_dir / WEIGHTS)
    dtype = dtype or _stored_dtype(tensors)
    tok = load_tokenizer(model_dir)           # checked against the sha256 the export recorded
    tok_path = find_tokenizer(model_dir)
    fast_tok = hf_tokenizer(tok_path)
    eos = fast_tok.id_to_token(tok.eos_id)
    train_config = card.training_config(model_dir, metadata)
    reports = card.eval_reports(model_dir)

    with new_directory(output) as out:
        meta = {**metadata, "format": "pt", "dtype": dtype}
        save_tensors({hf_name(k): v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
                     out / "model.safetensors", meta)
        hf_config = HFConfig(**cfg.to_dict(), bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                             architectures=["RRWKVForCausalLM"], auto_map=AUTO_MAP)
        hf_config.dtype = HF_DTYPES[dtype]
        hf_config.save_pretrained(out)
        GenerationConfig(bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id).save_pretrained(out)
        for name in REMOTE_CODE:
            shutil.copyfile(HERE / name, out / name)
        PreTrainedTokenizerFast(tokenizer_object=fast_tok, eos_token=eos, bos_token=eos).save_pretrained(out)
        # The tokenizer file itself as the model was trained with it (so --from hf-rrwkv gives it back byte for
        # byte): tokenizer_config.json names the special tokens, which AutoTokenizer adds on loading.
        shutil.copyfile(tok_path, out / ("tokenizer.json" if tok_path.suffix == ".json" else "tokenizer.model"))
        train_text = None
        if train_config is not None:
            train_text = train_config.read_text(errors="replace")
            (out / card.TRAINING_CONFIG).write_text(train_text)
        for name in reports:
            shutil.copyfile(model_dir / name, out / name)
        (out / "README.md").write_text(card.model_card(Path(output).name, cfg.to_dict(), metadata, train_text,
                                                       reports))
    return {**cfg.to_dict(), "dtype": dtype}


def _read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise UserError(f"--input {hf_dir}: no such directory; pass a folder written by --to hf-rrwkv")
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"--input {hf_dir}: no config.json there; pass a folder written by --to hf-rrwkv")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not JSON ({e}); pass a folder written by --to hf-rrwkv") from None
    if not isinstance(hf, dict):
        raise UserError(f"{cfg_file} holds no JSON object; pass a folder written by --to hf-rrwkv")
    if hf.get("model_type") == "rwkv":
        raise UserError(f"{cfg_file} is a Hugging Face RwkvForCausalLM (RWKV-4); convert it with --from hf-rwkv")
    if hf.get("model_type") != "rrwkv":
        raise UserError(f"{cfg_file} has model_type {hf.get('model_type')!r}, not 'rrwkv'; pass a folder written "
                        f"by --to hf-rrwkv")
    missing = [name for name in REMOTE_CODE if not (hf_dir / name).is_file()]
    if missing or not isinstance(hf.get("auto_map"), dict):
        what = ", ".join(missing) if missing else "the auto_map of config.json"
        raise UserError(f"{hf_dir} lacks its remote code ({what}), without which transformers cannot load it: "
                        f"copy the folder whole, or write it again with --to hf-rrwkv")
    return hf


def _read_hf_weights(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of the shards a model.safetensors.index.json names."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_tensors(single)
    if not index.is_file():
        raise UserError(f"--input {hf_dir}: no model.safetensors (or model.safetensors.index.json) there")
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise UserError(f"{index} names {name}, which is not in {hf_dir}; copy the folder whole")
        state.update(load_tensors(hf_dir / name))
    return state


def from_hf_rrwkv(hf_dir: Path, output: Path, dtype: Optional[str] = None) -> dict:
    """An HF_DIR written by to_hf_rrwkv (or saved by RRWKVForCausalLM.save_pretrained) -> a MODEL_DIR with the
    same tensors, bit for bit (in their stored dtype unless --dtype), for `run.init_from` or evaluation."""
    from ..model import RRWKVConfig
    hf_dir = Path(hf_dir)
    hf = _read_hf_config(hf_dir)
    check_new(output)
    fields = RRWKVConfig().to_dict()
    absent = [k for k in fields if k not in hf]
    if absent:
        raise UserError(f"{hf_dir / 'config.json'} lacks the RRWKV fields {absent}; write it again with --to hf-rrwkv")
    config = {k: hf[k] for k in fields}
    try:
        cfg = RRWKVConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{hf_dir / 'config.json'} is not an RRWKV config ({e})") from None
    raw = _read_hf_weights(hf_dir)
    try:
        state = {our_name(k): v for k, v in raw.items()}
    except KeyError as e:
        raise UserError(f"{hf_dir} holds tensor {e}, which RRWKVForCausalLM does not have") from None
    wrong = shape_mismatch(expected_shapes(cfg), {k: tuple(v.shape) for k, v in state.items()})
    if wrong:
        raise UserError(f"the weights in {hf_dir} do not fit its config.json ({wrong})")
    tokenizer = next((hf_dir / n for n in ("tokenizer.model", "tokenizer.json") if (hf_dir / n).is_file()), None)
    if tokenizer is None:
        raise UserError(f"{hf_dir} holds no tokenizer.model or tokenizer.json; copy the folder whole")
    single = hf_dir / "model.safetensors"
    metadata = {k: v for k, v in (tensors_metadata(single) if single.is_file() else {}).items()
                if k not in ("format", "tokenizer_sha256")}
    dtype = dtype or _stored_dtype(state)
    metadata.update(source=str(hf_dir.resolve()), converted_from="hf-rrwkv", dtype=dtype)
    with new_directory(output) as out:
        save_model_dir(state, cfg.to_dict(), tokenizer, out, dtype, metadata)
    return {**cfg.to_dict(), "dtype": dtype}
