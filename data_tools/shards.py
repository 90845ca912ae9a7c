"""`tokenize`: input documents -> webdataset tar shards of token ids + manifest.json.

Each work unit (see inputs.py) is tokenized by one worker into its own shards, written under a
temporary name in OUT/.work/ and renamed when complete, with a small result file written last;
a rerun after a kill skips units whose result file exists. When all units are done their shards
are renamed, in unit order, to OUT/shard-000000.tar, ... and manifest.json is written; a
finished set already in OUT (--overwrite) is replaced only then, so a failed run leaves it as it
was. Tar members carry fixed metadata (mtime 0, fixed owner and mode), so the same inputs and
settings give byte-identical output whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .inputs import (FileReport, WorkUnit, check_text_key, expand_inputs, iter_unit_documents,
                     merge_reports, plan_units, unit_input_bytes, SKIP_REASONS)
from .progress import Progress
from .manifest import (FORMAT, MANIFEST, dtype_for_vocab, install_shard_set, keeping_old_set,
                       output_dir)
from .tokenizer import Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 26   # ~128 MiB of uint16 per shard
DEFAULT_UNIT_BYTES = 1 << 24     # input bytes per work unit (the grain of --workers)
ENCODE_BATCH_CHARS = 1 << 20     # documents are encoded in batches of about this many characters
WORK = ".work"


@dataclass(frozen=True)
class Settings:
    tokenizer: str
    text_key: str = "text"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    max_doc_tokens: int | None = None
    strict: bool = False
    eos_token: str | None = None


class _HashingFile:
    """A write-only file that hashes what passes through (tarfile's stream mode only writes)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def close(self):
        self.f.close()


class _NpyTarWriter:
    """webdataset.TarWriter's output for {"__key__": key, "npy": array} samples (USTAR stream,
    `key.npy` members, fixed owner, mode and mtime), written with tarfile directly: importing
    webdataset imports torch, 2-3 s per spawned worker, longer than a small work unit takes."""

    def __init__(self, fileobj, user: str, group: str, mode: int, mtime: int):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)
        self.user, self.group, self.mode, self.mtime = user, group, mode, mtime

    def write(self, sample: dict) -> None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, sample["npy"])
        ti = tarfile.TarInfo(sample["__key__"] + ".npy")
        ti.size, ti.mtime, ti.mode = buf.tell(), self.mtime, self.mode
        ti.uname, ti.gname = self.user, self.group
        buf.seek(0)
        self.tar.addfile(ti, buf)

    def close(self) -> None:
        self.tar.close()


class _UnitShardWriter:
    """Rolls a unit's documents over into tar shards of about `shard_tokens` tokens each."""

    def __init__(self, work: Path, unit: int, shard_tokens: int):
        self.work, self.unit, self.shard_tokens = work, unit, shard_tokens
        self.shards: list[dict] = []
        self.writer = None
        self.samples = 0

    def _open(self):
        name = f"unit-{self.unit:06d}-{len(self.shards):04d}.tar"
        self.tmp = self.work / (name + ".tmp")
        self.file = _HashingFile(self.tmp)
        self.writer = _NpyTarWriter(self.file, user="rrwkv", group="rrwkv", mode=0o444, mtime=0)
        self.current = {"file": name, "docs": 0, "tokens": 0}

    def write(self, tokens: np.ndarray):
        if self.writer is None:
            self._open()
        # Keys are unique across the whole shard set and free of dots (webdataset splits there).
        self.writer.write({"__key__": f"{self.unit:06d}-{self.samples:09d}", "npy": tokens})
        self.samples += 1
        self.current["docs"] += 1
        self.current["tokens"] += int(tokens.size)
        if self.current["tokens"] >= self.shard_tokens:
            self.close()

    def close(self):
        if self.writer is None:
            return
        self.writer.close()
        self.file.close()
        self.current["sha256"] = self.file.sha.hexdigest()
        os.replace(self.tmp, self.work / self.current["file"])
        self.shards.append(self.current)
        self.writer = None


def _encode_batches(docs, tok: Tokenizer):
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= ENCODE_BATCH_CHARS:
            yield from zip(batch, tok.encode_batch(batch))
            batch, size = [], 0
    if batch:
        yield from zip(batch, tok.encode_batch(batch))


_TOKENIZER: Tokenizer | None = None


def _worker_tokenizer(settings: Settings) -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None or str(_TOKENIZER.path) != settings.tokenizer:
        _TOKENIZER = Tokenizer(settings.tokenizer, eos_token=settings.eos_token)
    return _TOKENIZER


def run_unit(unit: WorkUnit, settings: Settings, work: Path) -> dict:
    """Tokenize one work unit into its shards; returns (and saves) its result record."""
    done = work / f"unit-{unit.index:06d}.json"
    if done.is_file():
        return json.loads(done.read_text())
    tok = _worker_tokenizer(settings)
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    reports: dict[str, FileReport] = {}
    writer = _UnitShardWriter(work, unit.index, settings.shard_tokens)
    docs = iter_unit_documents(unit, settings.text_key, settings.strict, reports)
    n_docs = n_tokens = 0
    for text, ids in _encode_batches(docs, tok):
        arr = np.asarray(ids, dtype=dtype)
        step = settings.max_doc_tokens or max(arr.size, 1)
        for lo in range(0, arr.size, step):
            writer.write(arr[lo:lo + step])
        n_docs += 1
        n_tokens += arr.size
    writer.close()
    # docs_written counts documents (before any --max-doc-tokens split), per input file.
    written = sum(r.docs_read - sum(r.skipped.values()) for r in reports.values())
    assert written == n_docs, (written, n_docs)
    for r in reports.values():
        r.docs_written = r.docs_read - sum(r.skipped.values())
    result = {"unit": unit.index, "shards": writer.shards, "docs": n_docs, "tokens": n_tokens,
              "reports": [reports[p].to_json() for p in sorted(reports)]}
    return commit_unit(done, result)


def commit_unit(done: Path, result: dict) -> dict:
    """Record a finished work unit atomically: a rerun skips units whose record exists."""
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(result, sort_keys=True))
    os.replace(tmp, done)
    return result


def _call(fn_args):
    fn, args = fn_args
    return fn(*args)


def run_units(fn, jobs: list, workers: int, bar, unit_bytes: dict) -> list:
    """fn(*job) for every job: in `workers` spawned processes (no fork of a parent that may hold
    threads or torch) or here; results in completion order, the progress bar fed as units finish."""
    results = []
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap_unordered(_call, [(fn, job) for job in jobs]):
                results.append(r)
                bar.update(unit_bytes[r["unit"]], r["docs"], r["tokens"])
    else:
        for job in jobs:
            r = fn(*job)
            results.append(r)
            bar.update(unit_bytes[r["unit"]], r["docs"], r["tokens"])
    return results


@dataclass
class TokenizeResult:
    manifest_path: Path
    manifest: dict
    reports: list[FileReport]
    seconds: float

    def summary(self, key: str = "text") -> str:
        m = self.manifest
        lines = [f"wrote {m['total_docs']:,} documents, {m['total_tokens']:,} tokens in "
                 f"{len(m['shards'])} shard(s) to {self.manifest_path.parent} "
                 f"({m['total_tokens'] / max(self.seconds, 1e-9):,.0f} tokens/s)"]
        skipped = m["skipped"]
        if skipped:
            lines.append("skipped: " + ", ".join(
                f"{n:,} {SKIP_REASONS[r].format(key=key)}" for r, n in sorted(skipped.items())))
            for r in self.reports:
                if r.skipped or r.damaged:
                    lines.append(f"  {r.path}: read {r.docs_read:,}, written {r.docs_written:,}, "
                                 f"skipped {sum(r.skipped.values()):,}")
                    lines += [f"    {r.path}:{line}: {why}" if line else f"    {r.path}: {why}"
                              for line, why in r.examples]
                    if r.damaged:
                        lines.append(f"    {r.path}: {r.damaged}")
        return "\n".join(lines)


def tokenize_files(inputs, tokenizer: str | os.PathLike, output: str | os.PathLike, *,
                   workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   text_key: str = "text", max_doc_tokens: int | None = None,
                   strict: bool = False, eos_token: str | None = None,
                   unit_bytes: int = DEFAULT_UNIT_BYTES, overwrite: bool = False,
                   progress: bool | None = None, log_every: float = 30.0,
                   slice: tuple[int, int] | None = None) -> TokenizeResult:
    """Tokenize input files into OUT/shard-*.tar + OUT/manifest.json (see module docstring).

    slice (i, n): tokenize only the i-th of n contiguous runs of the work units (an array job's
    task); the shard sets of all slices, combined in slice order by `merge`, hold exactly the
    shards (same bytes) an unsliced run writes. progress: a bar on a terminal (None: when
    stderr is one), otherwise a plain line every `log_every` seconds (False: silent).
    """
    t0 = time.perf_counter()
    files = expand_inputs(inputs)
    tok = Tokenizer(tokenizer, eos_token=eos_token)  # validates in the parent, once
    if shard_tokens < 1 or unit_bytes < 1 or (max_doc_tokens is not None and max_doc_tokens < 1):
        raise DataError("--shard-tokens, --max-doc-tokens and --unit-mb must be positive")
    out = output_dir(output)
    replacing = (out / MANIFEST).exists()
    if replacing and not overwrite:
        raise DataError(f"{out} already holds a finished shard set ({MANIFEST}); choose another "
                        f"--output or pass --overwrite")
    settings = Settings(str(tok.path.resolve()), text_key, shard_tokens, max_doc_tokens,
                        strict, eos_token)
    units = plan_units(files, unit_bytes)
    if slice is not None:
        i, n = slice
        if not 0 <= i < n:
            raise DataError(f"--slice {i}/{n}: the slice index must be in 0..{n - 1}")
        units = units[i * len(units) // n:(i + 1) * len(units) // n]
    work = out / WORK
    plan = {"settings": settings.__dict__, "tokenizer_sha256": tok.sha256, "slice": slice,
            "units": [u.__dict__ for u in units],
            "sizes": [f.stat().st_size for f in files]}
    plan_file = work / "plan.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        shutil.rmtree(work)  # left by a run with other inputs or settings: nothing to reuse
    work.mkdir(exist_ok=True)
    plan_file.write_text(json.dumps(plan))

    jobs = [(u, settings, work) for u in units]
    sizes = {u.index: unit_input_bytes(u) for u in units}
    bar = Progress("tokenize", sum(sizes.values()), len(units), enabled=progress,
                   log_every=log_every)
    with keeping_old_set(out, replacing):  # the new set is made in `work` until it is complete
        results = run_units(run_unit, jobs, workers, bar, sizes)
        bar.close()
        results.sort(key=lambda r: r["unit"])
        reports = merge_reports([[FileReport.from_json(d) for d in r["reports"]] for r in results])
        for r in reports:
            check_text_key(r, text_key)
        if not sum(r.docs_written for r in reports):   # an empty set would only fail later, in training
            read = ", ".join(f"{r.path}: {r.docs_read:,} read" for r in reports[:5]) + (", ..." if len(reports) > 5 else "")
            raise DataError(f"the inputs hold no document to write ({read}); check that the files are the "
                            f"ones meant and not empty")
    manifest = _finish(out, work, tok, results)
    shutil.rmtree(work)
    return TokenizeResult(out / MANIFEST, manifest, reports, time.perf_counter() - t0)


def _finish(out: Path, work: Path, tok: Tokenizer, results: list[dict]) -> dict:
    """Install the finished units' shards in OUT (in unit order, as shard-000000.tar, ...) with
    a copy of the tokenizer and manifest.json, replacing any set there."""
    shards, skipped, staged = [], {}, {}
    for r in results:
        for s in r["shards"]:
            final = f"shard-{len(shards):06d}.tar"
            staged[final] = work / s["file"]
            shards.append({"file": final, "docs": s["docs"], "tokens": s["tokens"],
                           "sha256": s["sha256"]})
        for rep in r["reports"]:
            for reason, n in rep["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            if rep.get("damaged"):
                skipped["damaged"] = skipped.get("damaged", 0) + 1
    tok_name = "tokenizer.json" if tok.kind == "hf" else "tokenizer.model"
    shutil.copyfile(tok.path, work / tok_name)
    staged[tok_name] = work / tok_name
    manifest = {
        "format": FORMAT,
        "tokenizer": {"path": tok_name, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "kind": tok.kind},
        "dtype": dtype_for_vocab(tok.vocab_size),
        "shards": shards,
        "total_docs": sum(s["docs"] for s in shards),
        "total_tokens": sum(s["tokens"] for s in shards),
        "documents": sum(r["docs"] for r in results),
        "skipped": dict(sorted(skipped.items())),
    }
    install_shard_set(out, staged, manifest)
    return manifest
