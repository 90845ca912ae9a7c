"""Where a run's tokens come from: data.train / data.valid resolved to shard sets (the built-in corpus
built on first use), their tokenizers checked against each other and the model, and the batches a
data-parallel rank reads."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from ..distributed import Dist
from ..errors import UserError


@dataclass
class DataSources:
    train: Any                      # what TokenStream takes: a path or [(path, weight), ...]
    valid: Any
    vocab_size: int
    eos_id: int
    tokenizer: Optional[str]


def _manifest(path: str, key: str):
    from . import load_manifest
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


def check_sources(cfg: DictConfig) -> None:
    """Before any heavy start-up: data.train / data.valid name readable shard sets (the built-in
    corpus is built later, by prepare_data), and run.init_from a folder."""
    for key in ("data.train", "data.valid"):
        value = OmegaConf.select(cfg, key)
        if value not in (None, "builtin"):
            _sources(value, key)
    if cfg.run.init_from and not Path(cfg.run.init_from).is_dir():
        raise UserError(f"run.init_from={cfg.run.init_from}: no such folder; give an exported MODEL_DIR "
                        f"(rrwkv-export writes one)")


def prepare_data(cfg: DictConfig, d: Dist) -> DataSources:
    """Resolve data.train / data.valid (building the built-in corpus once) and check the tokenizer."""
    train, valid = cfg.data.train, cfg.data.valid
    if train == "builtin":
        from rrwkv.data_tools.builtin import prepare_builtin_corpus
        corpus = prepare_builtin_corpus(cfg.data.cache_dir, vocab_size=cfg.model.vocab_size,
                                        say=d.say)
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
    from . import check_tokenizer
    first = manifests[0]
    for m in manifests:  # every source made with the same tokenizer, fitting the model's vocabulary
        try:
            check_tokenizer(m, first.tokenizer_path, vocab_size=cfg.model.vocab_size)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
    return DataSources(train_src, valid_src, first.vocab_size, first.eos_id, str(first.tokenizer_path))


def train_batches(cfg: DictConfig, src: DataSources, layout):
    """This data-parallel rank's rows of every global batch: a TokenStream in lanes mode, G x M rows
    a step, row i of rank r being lane r*G*M + i, so every step's global batch is the same whatever
    the number of ranks (R), accumulation steps (G) and micro-batch size (M) are, and a checkpoint
    (every lane's position) resumes on another number of ranks."""
    from . import TokenStream
    return TokenStream(src.train, cfg.data.seq_len, layout.micro_batch_size * layout.grad_accum,
                       rank=layout.dp_rank, world_size=layout.data_parallel, num_workers=cfg.data.num_workers,
                       seed=cfg.run.seed, lanes=True)


def micro_batches(stream, micro_batch_size: int):
    """Each step's grad_accum micro-batches [(input_ids, labels), ...], split from one batch of `stream`."""
    for x, y in stream:
        yield list(zip(x.split(micro_batch_size), y.split(micro_batch_size)))


def valid_batches(cfg: DictConfig, src: DataSources, layout):
    """The first train.eval_batches batches of this rank's part of data.valid (the same every time)."""
    from . import TokenStream
    stream = TokenStream(src.valid, cfg.data.seq_len, cfg.data.micro_batch_size, rank=layout.dp_rank,
                         world_size=layout.data_parallel, num_workers=cfg.data.num_workers, seed=0, max_epochs=1)
    return itertools.islice(iter(stream), cfg.train.eval_batches)
