"""`verify`: check a shard set against its manifest (files, sha256, document and token counts,
token ids inside the vocabulary, the tokenizer's hash)."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import DataError
from .manifest import load_manifest
from .reader import iter_shard_docs
from .tokenizer import file_sha256


def _check_shard(m, i: int, hashes: bool) -> list[str]:
    s, path = m.shards[i], m.shard_path(i)
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if hashes and s.get("sha256"):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != s["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    docs = tokens = 0
    top = -1
    try:
        for _, doc in iter_shard_docs(path, np.dtype(m.dtype)):
            docs += 1
            tokens += doc.size
            if doc.size:
                top = max(top, int(doc.max()))
    except (DataError, OSError) as e:
        return problems + [f"{path}: {e}"]
    if (docs, tokens) != (s["docs"], s["tokens"]):
        problems.append(f"{path}: holds {docs:,} documents / {tokens:,} tokens, the manifest "
                        f"lists {s['docs']:,} / {s['tokens']:,}")
    if top >= m.vocab_size:
        problems.append(f"{path}: token id {top} is outside the vocabulary of {m.vocab_size}")
    return problems


def verify_shards(source, hashes: bool = True, workers: int = 2) -> tuple[list[str], str]:
    """(problems, summary) for the shard set at `source`; no problems means it is intact."""
    m = load_manifest(source, check_files=False)
    problems = []
    tok = m.tokenizer_path
    if not tok.is_file():
        problems.append(f"{tok}: tokenizer missing")
    elif file_sha256(tok) != m.data["tokenizer"]["sha256"]:
        problems.append(f"{tok}: sha256 differs from the manifest's tokenizer")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for found in pool.map(lambda i: _check_shard(m, i, hashes), range(len(m.shards))):
            problems += found
    bad = len({p.split(":")[0] for p in problems})
    summary = (f"{m.path}: {len(m.shards)} shard(s), {m.total_docs:,} documents, "
               f"{m.total_tokens:,} tokens: " + ("OK" if not problems else
                                                f"{len(problems)} problem(s) in {bad} file(s)"))
    return problems, summary
