"""manifest.json of a shard directory: writing, loading with validation, tokenizer checks.

    {"format": "rrwkv-shards-v1",
     "tokenizer": {"path": "tokenizer.model", "sha256": ..., "vocab_size": ..., "eos_id": ...},
     "dtype": "uint16" | "uint32",
     "shards": [{"file": "shard-000000.tar", "docs": ..., "tokens": ..., "sha256": ...}, ...],
     "total_docs": ..., "total_tokens": ..., "skipped": {reason: count}}

Paths inside are relative to the manifest's directory (the tokenizer is copied in beside the
shards), so a shard directory can be moved or copied to another machine as a whole.

A new shard set is made in a staging directory and only then moved into its output directory
(install_shard_set), so a failed run leaves a finished set there as it was.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

FORMAT = "rrwkv-shards-v1"
MANIFEST = "manifest.json"
DTYPES = ("uint16", "uint32")
REMAKE = "make it again with `python -m rrwkv.data_tools tokenize`"


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def manifest_path(source: str | os.PathLike) -> Path:
    """The manifest.json of a shard directory (or the file itself); FileNotFoundError if absent."""
    p = Path(source)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(
            f"data source {source} not found: expected a shard directory holding {MANIFEST} "
            f"(or the path of a {MANIFEST}); make one with `python -m rrwkv.data_tools tokenize`")
    return p


URL_RE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]+://)")


def is_url(source) -> bool:
    """True for webdataset URLs (`pipe:CMD`, `http(s)://...`, ...), False for local paths."""
    return isinstance(source, str) and bool(URL_RE.match(source)) and \
        not source.startswith("file://")


def _relative_url(url: str, name: str) -> str:
    """The URL of `name` beside the manifest at `url`.

    `pipe:` commands name the manifest somewhere in the command (`pipe:aws s3 cp
    s3://b/d/manifest.json -`): its last mention is replaced by the shard's relative path.
    """
    if url.startswith("pipe:"):
        head, sep, tail = url.rpartition(MANIFEST)
        if not sep:
            raise DataError(f"data source {url} is a pipe: command that does not name "
                            f"{MANIFEST}; the shards' commands are made by replacing that name")
        return head + name + tail
    return url.rsplit("/", 1)[0] + "/" + name


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated manifest; `dir` is where its relative paths start.

    `url` is set for a manifest read through a webdataset URL; shard locations are then URLs too.
    """
    path: Path
    data: dict
    url: str | None = None

    @property
    def name(self) -> str:
        """Where the manifest came from, for messages."""
        return self.url or str(self.path)

    def shard_location(self, i: int) -> str:
        """Local path or URL of shard i (what the reader opens)."""
        if self.url:
            return _relative_url(self.url, self.shards[i]["file"])
        return str(self.shard_path(i))

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def shards(self) -> list[dict]:
        return self.data["shards"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def vocab_size(self) -> int:
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.data["tokenizer"]["eos_id"])

    @property
    def total_tokens(self) -> int:
        return int(self.data["total_tokens"])

    @property
    def total_docs(self) -> int:
        return int(self.data["total_docs"])

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file, resolved against the manifest's directory."""
        return self.dir / self.data["tokenizer"]["path"]

    def shard_path(self, i: int) -> Path:
        return self.dir / self.shards[i]["file"]


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"manifest {path} is damaged: {what}; {REMAKE}")


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def load_manifest(source: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Load and validate a manifest (a shard directory or its manifest.json).

    Raises FileNotFoundError for a missing manifest or shard file (`check_files`) and DataError
    (a ValueError) for a manifest that does not follow the format; both name the file.
    """
    url = source if is_url(source) else None
    path = Path(url) if url else manifest_path(source)
    where = url or path
    try:
        data = json.loads(_read_url(url) if url else path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(where, f"not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise _fail(where, f"format is {got!r}, expected {FORMAT!r}")
    for key in ("tokenizer", "dtype", "shards", "total_docs", "total_tokens"):
        if key not in data:
            raise _fail(where, f"field {key!r} is missing")
    tok = data["tokenizer"]
    if not isinstance(tok, dict) or not all(k in tok for k in ("path", "sha256", "vocab_size",
                                                                "eos_id")) or \
            not isinstance(tok["path"], str) or not _count(tok["vocab_size"]) or \
            not _count(tok["eos_id"]):
        raise _fail(where, "field 'tokenizer' needs path, sha256, vocab_size and eos_id (the "
                           "last two whole numbers)")
    if data["dtype"] not in DTYPES:
        raise _fail(where, f"dtype {data['dtype']!r} is not one of {DTYPES}")
    if not (0 <= tok["eos_id"] < tok["vocab_size"]):
        raise _fail(where, f"eos_id {tok['eos_id']} is outside the vocabulary of "
                          f"{tok['vocab_size']}")
    shards = data["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and {"file", "docs", "tokens"} <= s.keys() and
            isinstance(s["file"], str) and _count(s["docs"]) and _count(s["tokens"])
            for s in shards):
        raise _fail(where, "every entry of 'shards' needs file, docs and tokens (the last two "
                           "whole numbers)")
    if sum(s["docs"] for s in shards) != data["total_docs"] or \
            sum(s["tokens"] for s in shards) != data["total_tokens"]:
        raise _fail(where, "total_docs/total_tokens disagree with the shard entries")
    m = Manifest(path, data, url)
    if check_files and not url:
        for i, s in enumerate(shards):
            if not m.shard_path(i).is_file():
                raise FileNotFoundError(f"shard {m.shard_path(i)} listed in {path} is missing; "
                                        f"copy the whole shard directory or {REMAKE}")
    return m


def _read_url(url: str) -> bytes:
    from webdataset.gopen import gopen

    try:
        with gopen(url, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"data source {url} could not be read ({e}); check the URL or "
                                f"command and that the manifest exists there") from None
    if not data:
        raise FileNotFoundError(f"data source {url} gave no data; check the URL or command")
    return data


def write_manifest(path: Path, data: dict) -> None:
    """Write atomically, with sorted keys, so equal content gives equal bytes."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def output_dir(path: str | os.PathLike) -> Path:
    """Make the output directory `path` (and its parents); DataError if that cannot be done."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"output {out} is an existing file or lies under one, not a directory; "
                        f"choose another --output") from None
    return out


@contextmanager
def keeping_old_set(out: Path, replacing: bool):
    """While a replacement for the finished set in `out` is made: errors say that set was kept."""
    try:
        yield
    except (DataError, FileNotFoundError) as e:
        if not replacing:
            raise
        raise type(e)(f"{e} (the shard set already in {out} was kept as it was)") from None


def install_shard_set(out: Path, staged: dict[str, Path], manifest: dict) -> None:
    """Move a finished shard set into `out`. `staged`: final name -> finished file on the same
    filesystem (shards, tokenizer). The old manifest goes first, then the old set's
    shard-*.tar files the new one does not list; the new manifest is written last, so a
    manifest.json in `out` only ever lists files that are there. A rerun after a kill in
    between finds the files already moved in place."""
    (out / MANIFEST).unlink(missing_ok=True)
    listed = {s["file"] for s in manifest["shards"]}
    for old in out.glob("shard-*.tar"):
        if old.name not in listed:
            old.unlink()
    for name, src in staged.items():
        if src.exists():
            os.replace(src, out / name)
    write_manifest(out / MANIFEST, manifest)


def check_tokenizer(manifest: Manifest | str | os.PathLike,
                    tokenizer_path: str | os.PathLike | None = None,
                    vocab_size: int | None = None) -> Manifest:
    """Check that the shards were made with this tokenizer and fit a model's vocabulary.

    `tokenizer_path`: the tokenizer the caller will decode with (compared by sha256);
    `vocab_size`: the model's embedding rows (every token id and EOS must be below it).
    Raises DataError (a ValueError) naming both files on a mismatch; returns the Manifest.
    """
    from .tokenizer import file_sha256

    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, check_files=False)
    if tokenizer_path is not None:
        tp = Path(tokenizer_path)
        if not tp.is_file():
            raise FileNotFoundError(f"tokenizer {tp} not found; pass the tokenizer the data "
                                    f"was made with ({m.tokenizer_path})")
        if file_sha256(tp) != m.data["tokenizer"]["sha256"]:
            raise DataError(f"tokenizer {tp} is not the one the shards of {m.path} were made with "
                            f"(sha256 differs); use {m.tokenizer_path} or re-tokenize the data "
                            f"with {tp}")
    if vocab_size is not None and m.vocab_size > vocab_size:
        raise DataError(f"the shards of {m.path} use a vocabulary of {m.vocab_size} tokens but the "
                        f"model has only {vocab_size}; set model.vocab_size >= {m.vocab_size} or "
                        f"use data made with a smaller tokenizer")
    return m
