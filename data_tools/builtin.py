"""The built-in corpus: Python's own standard library sources, so the default run needs no data.

The first call picks a deterministic few-MB subset of the running interpreter's stdlib modules
(one module file = one document, tests excluded), holds out a validation split, trains a
sentencepiece tokenizer and writes both splits with the normal `tokenize` path. The result is
cached under a key of the Python version and the settings; the build happens in a temporary
directory renamed into place at the end (an interrupted build leaves nothing that looks done),
under a file lock (ranks started together build once: the first takes the lock, the others
wait for it and then reuse the cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

from filelock import FileLock

from .manifest import MANIFEST
from .shards import tokenize_files
from .tokenizer import train_sentencepiece

BUILDER_VERSION = 1
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "lib2to3", "turtledemo", "ensurepip", "venv"}


class BuiltinCorpus(NamedTuple):
    train: Path       # manifest.json of the training split
    valid: Path       # manifest.json of the validation split
    tokenizer: Path   # the sentencepiece model both were made with


def default_cache_dir() -> Path:
    """$RRWKV_CACHE_DIR, else $XDG_CACHE_HOME/rrwkv, else ~/.cache/rrwkv."""
    if os.environ.get("RRWKV_CACHE_DIR"):
        return Path(os.environ["RRWKV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rrwkv"


def stdlib_documents(target_bytes: int, seed: int = 0) -> list[tuple[str, str]]:
    """(relative path, text) of a seeded, deterministic subset of stdlib modules, ~target_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
                   and not p.name.startswith("test_"))
    random.Random(seed).shuffle(files)
    docs, size = [], 0
    for p in files:
        if size >= target_bytes:
            break
        try:
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append((p.relative_to(root).as_posix(), text))
            size += len(text.encode())
    return docs


def _key(vocab_size: int, target_bytes: int, valid_fraction: float) -> str:
    settings = json.dumps([BUILDER_VERSION, sys.version, vocab_size, target_bytes,
                           valid_fraction], sort_keys=True)
    v = sys.version_info
    return (f"stdlib-py{v.major}.{v.minor}.{v.micro}-v{vocab_size}-"
            f"{hashlib.sha256(settings.encode()).hexdigest()[:10]}")


def prepare_builtin_corpus(cache_dir: str | os.PathLike | None = None, vocab_size: int = 2048,
                           target_bytes: int = 4_000_000, valid_fraction: float = 0.05,
                           shard_tokens: int = 200_000, say=None) -> BuiltinCorpus:
    """Build (first call) or reuse (later calls) the stdlib corpus; returns its manifest paths.

    `say(text)`, if given, is told what a first build is doing (it takes a minute or two)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / _key(vocab_size, target_bytes, valid_fraction)
    result = BuiltinCorpus(final / "train" / MANIFEST, final / "valid" / MANIFEST,
                           final / "tokenizer.model")
    if (final / "COMPLETE").is_file():
        return result
    with FileLock(str(final) + ".lock"):
        if (final / "COMPLETE").is_file():  # another process built it while we waited
            return result
        tmp = Path(f"{final}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        say = say or (lambda text: None)
        say(f"building the built-in corpus once (Python's standard library, {target_bytes / 1e6:.0f} MB: a "
            f"{vocab_size}-token tokenizer, then shards; a minute or two) in {final}")
        t0 = time.perf_counter()
        _build(tmp, vocab_size, target_bytes, valid_fraction, shard_tokens, say)
        shutil.rmtree(final, ignore_errors=True)  # a stale incomplete one from an older layout
        os.replace(tmp, final)
        say(f"built-in corpus ready in {time.perf_counter() - t0:.0f} s")
    return result


def _build(out: Path, vocab_size: int, target_bytes: int, valid_fraction: float,
           shard_tokens: int, say) -> None:
    docs = stdlib_documents(target_bytes)
    n_valid = max(1, int(len(docs) * valid_fraction))
    splits = {"valid": docs[:n_valid], "train": docs[n_valid:]}
    src = out / "source"
    src.mkdir(parents=True)
    for name, part in splits.items():
        with open(src / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for path, text in part:
                f.write(json.dumps({"text": text, "path": path}) + "\n")
    say(f"  training the tokenizer on {len(splits['train'])} modules")
    model = train_sentencepiece((text for _, text in splits["train"]), vocab_size,
                                out / "tokenizer",
                                record={"corpus": "python stdlib", "python": sys.version})
    say("  tokenizing into shards")
    for name in splits:
        tokenize_files([src / f"{name}.jsonl"], model, out / name, workers=1,
                       shard_tokens=shard_tokens, progress=False)
    shutil.rmtree(src)
    (out / "COMPLETE").write_text(json.dumps(
        {"documents": {k: len(v) for k, v in splits.items()}, "python": sys.version}) + "\n")
