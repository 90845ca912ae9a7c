#!/usr/bin/env python
"""Tokenize the carried study corpus into shards, once per corpus: prints the directory holding train/ and valid/.

    python benchmarks/long_range/prepare.py [--corpus .study] [--out /tmp/rrwkv-study-data] [--workers N]

--corpus is what benchmarks/long_range/corpus.py wrote (train.jsonl.xz, valid.jsonl.xz,
tokenizer.model). The shards go to OUT/<key>/{train,valid}, where the key hashes those three files
and the settings, so a warm machine (or a second run) reuses them; the directory appears only once
complete. Progress goes to stderr; the one line on stdout is OUT/<key>.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FILES = ("train.jsonl.xz", "valid.jsonl.xz", "tokenizer.model")
VERSION = 1


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def corpus_key(corpus: Path, shard_tokens: int, unit_mb: float) -> str:
    h = hashlib.sha256(json.dumps([VERSION, shard_tokens, unit_mb]).encode())
    for name in FILES:
        with open(corpus / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def unxz(src: Path, dst: Path) -> None:
    try:
        with lzma.open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except lzma.LZMAError as e:
        fail(f"{src} is not a complete .xz file ({e}); build or copy the corpus again")


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(ROOT / ".study"))
    p.add_argument("--out", default=os.environ.get("STUDY_DATA", "/tmp/rrwkv-study-data"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-tokens", type=int, default=500_000, help="small shards: a new shard order each epoch")
    p.add_argument("--unit-mb", type=float, default=4.0, help="input MB per work unit (parallelism; fixes the shards)")
    args = p.parse_args(argv)
    corpus = Path(args.corpus)
    missing = [n for n in FILES if not (corpus / n).is_file()]
    if missing:
        fail(f"{corpus} lacks {', '.join(missing)}: build the corpus with `python benchmarks/long_range/corpus.py` "
             f"(and carry .study to the GPU machine)")
    final = Path(args.out) / corpus_key(corpus, args.shard_tokens, args.unit_mb)
    if (final / "COMPLETE").is_file():
        print(f"study data: reusing {final}", file=sys.stderr)
        print(final)
        return 0

    from rrwkv.data_tools.errors import DataError
    from rrwkv.data_tools.shards import tokenize_files
    t0 = time.perf_counter()
    tmp = Path(f"{final}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "src").mkdir(parents=True)
    counts = {}
    for split in ("train", "valid"):
        src = tmp / "src" / f"{split}.jsonl"
        unxz(corpus / f"{split}.jsonl.xz", src)
        try:
            r = tokenize_files([src], corpus / "tokenizer.model", tmp / split, workers=args.workers,
                               shard_tokens=args.shard_tokens, unit_bytes=int(args.unit_mb * 2 ** 20), progress=False)
        except (DataError, FileNotFoundError) as e:
            fail(str(e))
        counts[split] = {"documents": r.manifest["total_docs"], "tokens": r.manifest["total_tokens"]}
    shutil.rmtree(tmp / "src")
    (tmp / "COMPLETE").write_text(json.dumps({"corpus": str(corpus.resolve()), **counts}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"study data: {counts['train']['tokens']:,} train / {counts['valid']['tokens']:,} valid tokens in {final} "
          f"({time.perf_counter() - t0:.1f} s, {args.workers} workers)", file=sys.stderr)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
