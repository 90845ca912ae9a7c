"""`import-binidx`: convert a Megatron-LM / GPT-NeoX indexed dataset (PREFIX.bin + PREFIX.idx,
the "mmap" format) into our shards, so token data made for those frameworks can be trained on
without re-tokenizing.

PREFIX.idx: b"MMIDIDX\\x00\\x00", version <Q> (1), dtype code <B>, sequence count <Q>, document
count <Q>, then sizes (int32, tokens per sequence), pointers (int64, byte offset of each
sequence in PREFIX.bin) and doc_idx (int64, the first sequence of each document, then the
count). A document is the concatenation of its sequences. Their preprocessing usually appends
an end-of-document token, which our loader adds itself: a trailing EOS is dropped unless
`keep_trailing_eos`. The tokenizer the data was made with must be given (for the manifest's
vocabulary and EOS id, and so that decoding works).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

from .errors import DataError
from .manifest import MANIFEST, dtype_for_vocab, output_dir
from .progress import Progress
from .shards import DEFAULT_SHARD_TOKENS, TokenizeResult, WORK, _UnitShardWriter, _finish, commit_unit, run_units
from .tokenizer import Tokenizer

MAGIC = b"MMIDIDX\x00\x00"
# Integer dtype codes, the same in Megatron-LM and GPT-NeoX (6/7 are floats and differ).
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
DEFAULT_UNIT_TOKENS = 1 << 25


def read_index(prefix: str | os.PathLike) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sizes, pointers, doc_idx) of PREFIX.idx; DataError naming the file if malformed."""
    idx = Path(f"{prefix}.idx")
    if not idx.is_file() or not Path(f"{prefix}.bin").is_file():
        raise FileNotFoundError(f"{prefix}.bin / {prefix}.idx not found; pass the common prefix "
                                f"of the two files to --input")
    with open(idx, "rb") as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[:9] != MAGIC:
        raise DataError(f"{idx} is not a Megatron/GPT-NeoX mmap index (bad magic); only the "
                        f"'mmap' indexed-dataset format is supported")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPES:
        raise DataError(f"{idx} has version {version} / dtype code {code}; expected version 1 "
                        f"and an integer dtype ({sorted(DTYPES)})")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    off = 34
    sizes = np.frombuffer(mm, np.int32, n_seq, off)
    pointers = np.frombuffer(mm, np.int64, n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(mm, np.int64, n_doc, off + 12 * n_seq)
    if n_doc < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq:
        raise DataError(f"{idx} is damaged: its document index does not cover its "
                        f"{n_seq} sequences")
    return np.dtype(DTYPES[code]), sizes, pointers, doc_idx


def _run_unit(prefix: str, unit: int, lo: int, hi: int, settings: dict, work: Path) -> dict:
    done = work / f"unit-{unit:06d}.json"
    if done.is_file():
        return json.loads(done.read_text())
    dtype, sizes, pointers, doc_idx = read_index(prefix)
    data = np.memmap(f"{prefix}.bin", mode="r", dtype=dtype)
    out_dtype = np.dtype(dtype_for_vocab(settings["vocab_size"]))
    writer = _UnitShardWriter(work, unit, settings["shard_tokens"])
    n_docs = n_tokens = empty = 0
    for d in range(lo, hi):
        s0, s1 = int(doc_idx[d]), int(doc_idx[d + 1])
        parts = [data[pointers[s] // dtype.itemsize:][:sizes[s]] for s in range(s0, s1)]
        doc = np.concatenate(parts) if parts else np.zeros(0, dtype)
        if not settings["keep_trailing_eos"] and doc.size and doc[-1] == settings["eos_id"]:
            doc = doc[:-1]
        if not doc.size:
            empty += 1
            continue
        if int(doc.min()) < 0 or int(doc.max()) >= settings["vocab_size"]:
            raise DataError(f"{prefix}.bin document {d} holds token id "
                            f"{int(doc.max()) if doc.max() >= 0 else int(doc.min())}, outside "
                            f"the vocabulary of {settings['vocab_size']} of --tokenizer; pass "
                            f"the tokenizer the data was made with")
        writer.write(doc.astype(out_dtype))
        n_docs += 1
        n_tokens += doc.size
    writer.close()
    report = {"path": f"{prefix}.bin", "docs_read": hi - lo, "docs_written": n_docs,
              "lines": hi - lo, "skipped": {"empty": empty} if empty else {}, "examples": []}
    return commit_unit(done, {"unit": unit, "shards": writer.shards, "docs": n_docs, "tokens": n_tokens,
                              "reports": [report]})




def import_binidx(prefix: str | os.PathLike, tokenizer: str | os.PathLike,
                  output: str | os.PathLike, *, workers: int = 1,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, unit_tokens: int = DEFAULT_UNIT_TOKENS,
                  keep_trailing_eos: bool = False, eos_token: str | None = None,
                  progress: bool | None = None, log_every: float = 30.0) -> TokenizeResult:
    """Convert PREFIX.bin/.idx into OUT/shard-*.tar + manifest.json (resumable, like tokenize)."""
    t0 = time.perf_counter()
    prefix = str(prefix).removesuffix(".bin").removesuffix(".idx")
    dtype, sizes, pointers, doc_idx = read_index(prefix)
    tok = Tokenizer(tokenizer, eos_token=eos_token)
    out = output_dir(output)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a finished shard set ({MANIFEST}); choose another "
                        f"--output")
    # Documents grouped into units of about unit_tokens: the grain of --workers.
    seq_ends = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    doc_tokens = seq_ends[doc_idx[1:]] - seq_ends[doc_idx[:-1]]
    cuts = np.searchsorted(np.cumsum(doc_tokens), np.arange(unit_tokens, doc_tokens.sum() + 1,
                                                            unit_tokens), side="right")
    bounds = sorted({0, *map(int, cuts), len(doc_tokens)})
    ranges = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    settings = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "shard_tokens": shard_tokens,
                "keep_trailing_eos": keep_trailing_eos}
    work = out / WORK
    plan = {"settings": settings, "tokenizer_sha256": tok.sha256, "ranges": ranges,
            "input": os.path.abspath(prefix), "size": os.path.getsize(f"{prefix}.bin")}
    plan_file = work / "plan.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    plan_file.write_text(json.dumps(plan))
    jobs = [(prefix, u, a, b, settings, work) for u, (a, b) in enumerate(ranges)]
    unit_bytes = [int(doc_tokens[a:b].sum()) * dtype.itemsize for a, b in ranges]
    bar = Progress("import-binidx", sum(unit_bytes), len(jobs), enabled=progress,
                   log_every=log_every)
    results = run_units(_run_unit, jobs, workers, bar, unit_bytes)
    bar.close()
    results.sort(key=lambda r: r["unit"])
    manifest = _finish(out, work, tok, results)
    shutil.rmtree(work)
    from .inputs import FileReport, merge_reports

    reports = merge_reports([[FileReport.from_json(d) for d in r["reports"]] for r in results])
    return TokenizeResult(out / MANIFEST, manifest, reports, time.perf_counter() - t0)
