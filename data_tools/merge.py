"""`merge`: combine the manifests of separately produced shard sets (e.g. the slices of an
array job) into one manifest.json.

Shard sets under the output directory are referenced where they lie (the manifest holds paths
relative to itself, so nothing is copied); others are hard-linked (or copied, across
filesystems) into it, through OUTPUT/.merge/ so that a set already there (--overwrite) is
replaced only once the new one is complete. All inputs must share one tokenizer and dtype.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock

from .errors import DataError
from .manifest import (FORMAT, MANIFEST, REMAKE, install_shard_set, keeping_old_set,
                       load_manifest, output_dir)

STAGING = ".merge"


def merge_shard_sets(inputs, output: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write OUTPUT/manifest.json listing the shards of `inputs` (directories), in that order."""
    out = output_dir(output)
    replacing = (out / MANIFEST).exists()
    if replacing and not overwrite:
        raise DataError(f"{out} already holds a {MANIFEST}; choose another --output or pass "
                        f"--overwrite")
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a merge that was killed
    staging.mkdir()
    try:
        with keeping_old_set(out, replacing):
            manifest = _stage(inputs, out, staging)
        install_shard_set(out, {p.name: p for p in staging.iterdir()}, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _stage(inputs, out: Path, staging: Path) -> dict:
    """The merged manifest; the files to move into `out` are put in `staging`."""
    ms = [load_manifest(p) for p in inputs]
    if not ms:
        raise DataError("merge needs at least one shard directory")
    first = ms[0]
    for m in ms[1:]:
        if m.data["tokenizer"]["sha256"] != first.data["tokenizer"]["sha256"] or \
                m.dtype != first.dtype:
            raise DataError(f"{m.path} and {first.path} were made with different tokenizers; "
                            f"merge only shard sets made with the same one")
    shards, skipped, documents = [], {}, 0
    for m in ms:
        for i, s in enumerate(m.shards):
            src = m.shard_path(i).resolve()
            try:
                rel = src.relative_to(out.resolve())
            except ValueError:
                rel = Path(f"shard-{len(shards):06d}.tar")
                _link_or_copy(src, staging / rel)
            shards.append({**s, "file": rel.as_posix()})
        for reason, n in m.data.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
        documents += m.data.get("documents", m.total_docs)
    if len({s["file"] for s in shards}) < len(shards):
        raise DataError(f"merging {', '.join(map(str, inputs))} into {out} would list a shard file "
                        f"twice (a set in {out} is given, or named like the linked-in shards); "
                        f"merge into a new directory")
    tok = first.data["tokenizer"]
    name = Path(tok["path"]).name
    if not first.tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer {first.tokenizer_path} listed in {first.path} is "
                                f"missing; copy the whole shard directory or {REMAKE}")
    shutil.copyfile(first.tokenizer_path, staging / name)
    manifest = {"format": FORMAT, "tokenizer": {**tok, "path": name}, "dtype": first.dtype,
                "shards": shards, "total_docs": sum(s["docs"] for s in shards),
                "total_tokens": sum(s["tokens"] for s in shards), "documents": documents,
                "skipped": dict(sorted(skipped.items()))}
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def slice_dir(output: str | os.PathLike, i: int, n: int) -> Path:
    """Where slice i of n of a sliced `tokenize --output OUTPUT` writes its shard set."""
    return Path(output) / "slices" / f"{i:05d}-of-{n:05d}"


def merge_if_complete(output: str | os.PathLike, n: int) -> dict | None:
    """Merge the n slices of OUTPUT once all are finished (the last one to finish does it)."""
    out = Path(output)
    with FileLock(str(out / ".merge.lock")):
        parts = [slice_dir(out, i, n) for i in range(n)]
        if (out / MANIFEST).exists() or not all((p / MANIFEST).is_file() for p in parts):
            return None
        return merge_shard_sets(parts, out)
