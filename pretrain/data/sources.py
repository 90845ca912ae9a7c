"""Where a run's tokens come from: data.train / data.valid resolved to shard sets (the built-in corpus
built on first use), their tokenizers checked against each other and the model, and the batches a
data-parallel rank reads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
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
    train_names: Optional[List[str]] = None   # each source's name where data.train mixes several
    valid_names: Optional[List[str]] = None   # ... and where data.valid does


def _manifest(path: str, key: str):
    from . import load_manifest
    try:
        return load_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{key}: {e}") from None


ENTRY_KEYS = ("path", "weight", "name")


def _default_name(m) -> str:
    """A mixed source's name unless given: the folder its manifest.json is in (of a path or a URL)."""
    where = m.name.split("manifest.json")[0].rstrip("/")
    return where.rsplit("/", 1)[-1] or where


def _sources(value: Any, key: str) -> Tuple[Any, list, Optional[List[str]]]:
    """(TokenStream source, manifests, names) for a config value: a path (names None) or a list of
    {path, weight, name} (name: default the manifest's folder; the names must differ)."""
    if isinstance(value, (str, Path)):
        m = _manifest(str(value), key)
        return str(m.path), [m], None
    items = OmegaConf.to_container(value) if not isinstance(value, list) else value
    if not isinstance(items, list) or not items:
        raise UserError(f"{key} must be a path or a list of {{path: ..., weight: ..., name: ...}}")
    src, manifests, names = [], [], []
    for it in items:
        if not isinstance(it, dict) or "path" not in it:
            raise UserError(f"{key}: each entry must be {{path: ..., weight: ..., name: ...}}, got {it!r}")
        unknown = sorted(set(it) - set(ENTRY_KEYS))
        if unknown:
            raise UserError(f"{key}: entry {it!r} has unknown key(s) {unknown}; an entry takes {', '.join(ENTRY_KEYS)}")
        m = _manifest(str(it["path"]), key)
        src.append((str(m.path), float(it.get("weight", 1.0))))
        manifests.append(m)
        names.append(str(it["name"]) if it.get("name") is not None else _default_name(m))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{key}: several sources are named {twice[0]!r} (metrics are logged per source name); "
                        f"give each entry its own name: {{path: ..., weight: ..., name: ...}}")
    return src, manifests, names


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
    train_src, manifests, train_names = _sources(train, "data.train")
    if valid == "builtin":
        raise UserError("data.valid=builtin is the validation split of data.train=builtin; give data.valid a "
                        "shard directory of your own (or null)")
    valid_src, valid_names = None, None
    if valid:
        valid_src, vm, valid_names = _sources(valid, "data.valid")
        manifests += vm
    from . import check_tokenizer
    first = manifests[0]
    for m in manifests:  # every source made with the same tokenizer, fitting the model's vocabulary
        try:
            check_tokenizer(m, first.tokenizer_path, vocab_size=cfg.model.vocab_size)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
    return DataSources(train_src, valid_src, first.vocab_size, first.eos_id, str(first.tokenizer_path),
                       train_names=_mixed(train_names), valid_names=_mixed(valid_names))


def _mixed(names: Optional[List[str]]) -> Optional[List[str]]:
    """The names of a mix of several sources (per-source metrics); None for one source."""
    return names if names is not None and len(names) > 1 else None


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


def valid_batches(cfg: DictConfig, src: DataSources, layout, source: Any = None):
    """The first train.eval_batches batches of this rank's part of data.valid (the same every time);
    `source`: one shard set of it instead (valid_sources)."""
    from ..evaluation import training_windows      # (launch/evaluate.py --windows reads the same)
    return training_windows(src.valid if source is None else source, cfg.data.seq_len, cfg.data.micro_batch_size,
                            cfg.train.eval_batches, layout.dp_rank, layout.data_parallel, cfg.data.num_workers)


def valid_sources(cfg: DictConfig, src: DataSources, layout) -> Iterable[Tuple[str, Iterable]]:
    """(name, its batches) for each source of a mixed data.valid (none otherwise): each source's
    validation split, evaluated on its own beside the mix."""
    if src.valid_names is None:
        return
    for name, (path, _) in zip(src.valid_names, src.valid):
        yield name, valid_batches(cfg, src, layout, source=path)


def tokens_by_source(src: DataSources, stream, skipped: Iterable[int], device: torch.device,
                     pipeline_stages: int) -> Dict[str, Dict[str, int]]:
    """{"tokens_by_source": {name: tokens}}: the training tokens taken from each source of a mixed
    data.train since the start of the run, summed over the data-parallel ranks ({} for one source).

    They follow from the stream's position, so they continue across resumes and rollbacks;
    `skipped`: the data windows (1-based batches) a rollback passed over, not trained on. Every
    pipeline stage reads the same lanes, so the sum over all processes is divided by the stages.
    Call it on every rank (one all-reduce)."""
    if src.train_names is None:
        return {}
    import torch.distributed as dist
    counts = torch.tensor(stream.source_counts(exclude=skipped), dtype=torch.int64, device=device)
    tokens = counts * stream.tokens_per_batch
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tokens)
    return {"tokens_by_source": dict(zip(src.train_names, (int(t) // pipeline_stages for t in tokens.tolist())))}
