"""Tokenize speed: data_tools tokenize with 1 and 2 workers against sentencepiece's own batch
encode on one thread, over the same text, in one run.

    python benchmarks/data_tokenize.py [--mb 12] [--vocab 4096] [--out DIR]

Targets (issue 4): 1 worker >= 80% of sentencepiece's tokens/s; 2 workers >= 1.6x 1 worker.
The text is a seeded sample of the Python standard library (many files, not one). The machine's
load average is printed before and after: on a shared machine the figures move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


from rrwkv.data_tools.builtin import stdlib_documents
from rrwkv.data_tools.shards import tokenize_files
from rrwkv.data_tools.tokenizer import Tokenizer, train_sentencepiece


def _cpu() -> float:
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=12.0, help="MB of text")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default=None, help="keep the work here (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="rrwkv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = [t for _, t in stdlib_documents(int(args.mb * 1e6), seed=1)]
    size = sum(len(t.encode()) for t in docs)
    # Several jsonl files so that work units come from more than one input.
    n_files = 8
    for i in range(n_files):
        (work / f"in-{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in docs[i::n_files]))
    model = work / "sp.model"
    if not model.exists():
        train_sentencepiece(docs[: max(1, len(docs) // 4)], args.vocab, work / "sp")
    tok = Tokenizer(model)
    print(f"text: {len(docs):,} documents, {size / 1e6:.1f} MB; vocab {tok.vocab_size}; "
          f"load average before: {os.getloadavg()}")

    cores = {}

    def best(fn, name):
        times = []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), _cpu()
            out = fn()
            times.append(time.perf_counter() - t0)
            cores[name] = (_cpu() - c0) / times[-1]
        return min(times), out

    def sp_encode():
        # sentencepiece's own batch encode on one thread, in the batches tokenize uses.
        n, batch, chars = 0, [], 0
        for t in docs:
            batch.append(t)
            chars += len(t)
            if chars >= 1 << 20:
                n += sum(map(len, tok._sp.encode(batch, num_threads=1)))
                batch, chars = [], 0
        return n + sum(map(len, tok._sp.encode(batch, num_threads=1)))

    def run(workers):
        out = work / f"shards-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        r = tokenize_files(sorted(work.glob("in-*.jsonl")), model, out, workers=workers,
                           unit_bytes=1 << 20, progress=False)
        return r.manifest["total_tokens"]

    t_sp, n_sp = best(sp_encode, "sp")
    t1, n1 = best(lambda: run(1), "w1")
    t2, n2 = best(lambda: run(2), "w2")
    assert n1 == n2 == n_sp, (n1, n2, n_sp)
    sp, w1, w2 = n_sp / t_sp, n1 / t1, n2 / t2
    print(f"sentencepiece encode, 1 thread: {sp:,.0f} tokens/s ({size / t_sp / 1e6:.2f} MB/s)")
    print(f"tokenize --workers 1:           {w1:,.0f} tokens/s ({size / t1 / 1e6:.2f} MB/s), "
          f"{100 * w1 / sp:.0f}% of sentencepiece (target >= 80%)")
    print(f"tokenize --workers 2:           {w2:,.0f} tokens/s ({size / t2 / 1e6:.2f} MB/s), "
          f"{w2 / w1:.2f}x one worker (target >= 1.6x)")
    print("CPU cores this process and its workers got (CPU seconds / wall seconds): " +
          ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    print(f"tokens: {n1:,}; load average after: {os.getloadavg()}; cpus: {os.cpu_count()}")
    if not args.out:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
