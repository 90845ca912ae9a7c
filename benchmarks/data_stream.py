"""TokenStream speed: tokens/s that one process gets from its DataLoader workers.

    python benchmarks/data_stream.py --shards DIR [--seq-len 4096] [--batch 8] [--workers 2]

Target (issue 4): >= 2M tokens/s from one process with 2 workers at seq_len 4096. Without
--shards, a shard set is made from a seeded sample of the Python standard library (the stream
then cycles over its epochs). The first batch (worker start-up) is not timed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


from rrwkv.pretrain.data import TokenStream


def make_shards(work: Path) -> Path:
    import json

    from rrwkv.data_tools.builtin import stdlib_documents
    from rrwkv.data_tools.shards import tokenize_files
    from rrwkv.data_tools.tokenizer import train_sentencepiece

    docs = [t for _, t in stdlib_documents(8_000_000, seed=2)]
    (work / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    model = train_sentencepiece(docs[: len(docs) // 4], 4096, work / "sp")
    tokenize_files([work / "in.jsonl"], model, work / "shards", workers=2,
                   shard_tokens=1 << 19, unit_bytes=1 << 20, progress=False)
    return work / "shards"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default=None)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    ap.add_argument("--shuffle-tokens", type=int, nargs="+", default=[1 << 22, 0])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    shards = Path(args.shards) if args.shards else make_shards(Path(tempfile.mkdtemp()))
    print(f"shards {shards}; seq_len {args.seq_len}, batch {args.batch}; "
          f"load average before: {os.getloadavg()}")
    for workers in args.workers:
        for shuffle in args.shuffle_tokens:
            s = TokenStream(shards, args.seq_len, args.batch, num_workers=workers, seed=0,
                            shuffle_tokens=shuffle)
            it = iter(s)
            next(it)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                x, y = next(it)
                n += x.numel()
            dt = time.perf_counter() - t0
            st = s.stats()
            print(f"workers {workers}, shuffle_tokens {shuffle}: {n / dt / 1e6:.2f}M tokens/s "
                  f"({n:,} tokens in {dt:.1f} s; waited {st['data_wait_s']:.2f} s)")
            del it
    print(f"load average after: {os.getloadavg()}; cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
