"""`merge`: combine the manifests of separately produced shard sets (e.g. the slices of an
array job) into one manifest.json.

Shard sets under the output directory are referenced where they lie (the manifest holds paths
relative to itself, so nothing is copied); others are hard-linked (or copied, across
filesystems) into it. All inputs must share one tokenizer and dtype.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock

from .errors import DataError
from .manifest import FORMAT, MANIFEST, load_manifest, write_manifest


def merge_shard_sets(inputs, output: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write OUTPUT/manifest.json listing the shards of `inputs` (directories), in that order."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists() and not overwrite:
        raise DataError(f"{out} already holds a {MANIFEST}; choose another --output or pass "
                        f"--overwrite")
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
                _link_or_copy(src, out / rel)
            shards.append({**s, "file": rel.as_posix()})
        for reason, n in m.data.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
        documents += m.data.get("documents", m.total_docs)
    tok = first.data["tokenizer"]
    dst = out / Path(tok["path"]).name
    if not dst.exists():
        shutil.copyfile(first.tokenizer_path, dst)
    manifest = {"format": FORMAT, "tokenizer": {**tok, "path": dst.name}, "dtype": first.dtype,
                "shards": shards, "total_docs": sum(s["docs"] for s in shards),
                "total_tokens": sum(s["tokens"] for s in shards), "documents": documents,
                "skipped": dict(sorted(skipped.items()))}
    write_manifest(out / MANIFEST, manifest)
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
        os.replace(dst.with_name(dst.name + ".tmp"), dst)


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
