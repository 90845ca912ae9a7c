"""`inspect`: statistics, a document length histogram and decoded samples of a shard directory."""
from __future__ import annotations

import numpy as np

from .manifest import load_manifest
from .reader import iter_shard_docs


def inspect_shards(source, samples: int = 3, sample_chars: int = 400, max_docs: int = 200_000) -> str:
    """A plain-text report on the shard set at `source` (directory or manifest.json)."""
    m = load_manifest(source)
    tok = m.data["tokenizer"]
    lines = [f"{m.path}",
             f"  format {m.data['format']}, dtype {m.dtype}, tokenizer {tok['path']} "
             f"(vocab {tok['vocab_size']}, eos {tok['eos_id']}, sha256 {tok['sha256'][:12]}...)",
             f"  {len(m.shards)} shard(s), {m.total_docs:,} documents, {m.total_tokens:,} tokens, "
             f"{m.total_tokens / max(m.total_docs, 1):,.1f} tokens/document"]
    if m.data.get("skipped"):
        lines.append("  skipped while tokenizing: " + ", ".join(
            f"{n:,} {r}" for r, n in m.data["skipped"].items()))
    for i, s in enumerate(m.shards[:10]):
        lines.append(f"  {s['file']}: {s['docs']:,} docs, {s['tokens']:,} tokens")
    if len(m.shards) > 10:
        lines.append(f"  ... {len(m.shards) - 10} more shard(s)")

    lengths, first = [], []
    for i in range(len(m.shards)):
        for _, doc in iter_shard_docs(m.shard_path(i), np.dtype(m.dtype)):
            lengths.append(doc.size)
            if len(first) < samples:
                first.append(doc)
            if len(lengths) >= max_docs:
                break
        if len(lengths) >= max_docs:
            break
    lengths = np.asarray(lengths)
    if lengths.size:
        note = "" if lengths.size == m.total_docs else f" (first {lengths.size:,} documents)"
        lines.append(f"document length in tokens{note}: min {lengths.min()}, median "
                     f"{int(np.median(lengths))}, mean {lengths.mean():.1f}, max {lengths.max()}")
        edges = 2 ** np.arange(0, int(np.log2(max(lengths.max(), 1))) + 2)
        counts, _ = np.histogram(lengths, bins=np.concatenate([[0], edges]))
        width = 40 / max(counts.max(), 1)
        lo = 0
        for hi, c in zip(edges, counts):
            if c:
                lines.append(f"  [{lo:>8}, {hi:>8}) {c:>9,} {'#' * max(1, int(c * width))}")
            lo = hi
    try:
        from .tokenizer import Tokenizer

        decoder = Tokenizer(m.tokenizer_path)
    except (OSError, ValueError) as e:
        lines.append(f"(no decoded samples: {e})")
        decoder = None
    for k, doc in enumerate(first if decoder else []):
        text = decoder.decode(doc.tolist())
        cut = text[:sample_chars] + ("..." if len(text) > sample_chars else "")
        lines.append(f"--- document {k} ({doc.size} tokens, {len(text)} characters) ---")
        lines.append(cut)
    return "\n".join(lines)
