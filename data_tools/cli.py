"""Data preprocessing for RRWKV: tokenizer training, sharded tokenization, inspection.

    rrwkv-data train-tokenizer --input FILES... --vocab-size N --output PREFIX
    rrwkv-data tokenize --input FILES... --tokenizer PREFIX.model --output DIR --workers N
    rrwkv-data inspect DIR
    rrwkv-data verify DIR                     # files, sha256, counts vs the manifest
    rrwkv-data merge DIR... --output DIR      # combine separately made shard sets
    rrwkv-data import-binidx --input PREFIX --tokenizer TOK --output DIR
    sbatch --array=0-K launch/slurm/preprocess.sbatch --input ... --tokenizer ... --output DIR

`python -m rrwkv.data_tools ...` is the same program. This package imports no torch, so
preprocessing jobs start fast and run without a GPU stack.
"""
from __future__ import annotations

import argparse
import sys

from .errors import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a byte-fallback sentencepiece BPE")
    t.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl(.gz/.zst) files or dirs")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="PREFIX: writes PREFIX.model and PREFIX.json")
    t.add_argument("--text-key", default="text", help="JSONL field holding the text")
    t.add_argument("--max-docs", type=int, default=0, help="train on the first N documents (0: all)")
    t.add_argument("--sample-docs", type=int, default=0,
                   help="train on a seeded uniform sample of N documents of all inputs (streamed; 0: all)")
    t.add_argument("--seed", type=int, default=0, help="seed of --sample-docs")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--no-split-digits", action="store_true", help="let merges span digits")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra user-defined symbols")

    k = sub.add_parser("tokenize", help="tokenize documents into webdataset shards + manifest.json")
    k.add_argument("--input", nargs="+", required=True,
                   help=".txt / .jsonl(.gz/.zst) / .parquet files, directories or glob patterns")
    k.add_argument("--tokenizer", required=True, help="sentencepiece .model or HF tokenizer.json")
    k.add_argument("--output", required=True, help="output directory")
    k.add_argument("--workers", type=int, default=1)
    k.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (about)")
    k.add_argument("--text-key", default="text", help="JSONL field holding the text")
    k.add_argument("--max-doc-tokens", type=int, default=None,
                   help="split documents longer than this into several samples")
    k.add_argument("--strict", action="store_true",
                   help="stop at the first malformed record instead of skipping and counting it")
    k.add_argument("--eos-token", default=None, help="end-of-document token of the tokenizer")
    k.add_argument("--unit-mb", type=float, default=16,
                   help="input MB per work unit; the output depends on it, not on --workers")
    k.add_argument("--overwrite", action="store_true", help="replace a finished shard set in --output")
    k.add_argument("--slice", default=None, metavar="I/N",
                   help="tokenize only slice I of N of the work units (an array job's task) into "
                        "OUTPUT/slices/I-of-N; combine them with merge")
    k.add_argument("--merge-when-complete", action="store_true",
                   help="with --slice: the task that finishes last merges all slices into OUTPUT")
    k.add_argument("--log-every", type=float, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal")
    k.add_argument("--no-progress", action="store_true", help="no progress bar or lines")

    v = sub.add_parser("verify", help="check shard files, sha256 and counts against the manifest")
    v.add_argument("dir", help="shard directory or manifest.json")
    v.add_argument("--no-hash", action="store_true", help="skip the sha256 of each shard")
    v.add_argument("--workers", type=int, default=2)

    g = sub.add_parser("merge", help="combine the manifests of separately produced shard sets")
    g.add_argument("inputs", nargs="+", help="shard directories, in the order to list them")
    g.add_argument("--output", required=True, help="directory for the combined manifest.json")
    g.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("import-binidx", help="convert a Megatron/GPT-NeoX .bin/.idx dataset")
    b.add_argument("--input", required=True, help="PREFIX of PREFIX.bin and PREFIX.idx")
    b.add_argument("--tokenizer", required=True, help="the tokenizer the data was made with")
    b.add_argument("--output", required=True, help="output directory")
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (about)")
    b.add_argument("--keep-trailing-eos", action="store_true",
                   help="keep an EOS that ends a document (the loader adds one itself)")
    b.add_argument("--eos-token", default=None, help="end-of-document token of the tokenizer")

    i = sub.add_parser("inspect", help="statistics, length histogram and decoded samples")
    i.add_argument("dir", help="shard directory or manifest.json")
    i.add_argument("--samples", type=int, default=3)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train-tokenizer":
            from itertools import islice

            from .inputs import read_documents
            from .tokenizer import train_sentencepiece

            if args.max_docs < 0 or args.sample_docs < 0:
                raise DataError("--max-docs and --sample-docs take a count >= 0 (0: all documents)")
            reports = {}
            docs = read_documents(args.input, args.text_key, reports)
            if args.max_docs:
                docs = islice(docs, args.max_docs)
            if args.sample_docs:
                from .tokenizer import sample_documents
                docs = sample_documents(docs, args.sample_docs, args.seed)
            path = train_sentencepiece(docs, args.vocab_size, args.output,
                                       model_type=args.model_type,
                                       split_digits=not args.no_split_digits,
                                       user_defined_symbols=args.special_tokens,
                                       record={"inputs": sorted(args.input), "max_docs": args.max_docs,
                                               "sample_docs": args.sample_docs, "seed": args.seed})
            for r in reports.values():
                if r.damaged:
                    print(f"warning: {r.path}: {r.damaged}", file=sys.stderr)
            print(f"wrote {path} and {path.with_suffix('.json')}")
        elif args.command == "tokenize":
            from .shards import DEFAULT_SHARD_TOKENS, tokenize_files

            output, part = args.output, None
            if args.slice:
                from .merge import slice_dir

                try:
                    i, n = (int(x) for x in args.slice.split("/"))
                except ValueError:
                    raise DataError(f"--slice {args.slice}: write it as I/N, e.g. 3/16") from None
                part = (i, n)
                output = slice_dir(args.output, i, n)
            result = tokenize_files(args.input, args.tokenizer, output, workers=args.workers,
                                    shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                                    text_key=args.text_key, max_doc_tokens=args.max_doc_tokens,
                                    strict=args.strict, eos_token=args.eos_token,
                                    overwrite=args.overwrite,
                                    unit_bytes=int(args.unit_mb * (1 << 20)),
                                    progress=False if args.no_progress else None,
                                    log_every=args.log_every, slice=part)
            print(result.summary(args.text_key))
            if part and args.merge_when_complete:
                from .merge import merge_if_complete

                merged = merge_if_complete(args.output, part[1])
                if merged:
                    print(f"merged {part[1]} slice(s) into {args.output}: "
                          f"{merged['total_docs']:,} documents, {merged['total_tokens']:,} "
                          f"tokens in {len(merged['shards'])} shard(s)")
        elif args.command == "verify":
            from .verify import verify_shards

            problems, summary = verify_shards(args.dir, hashes=not args.no_hash,
                                              workers=args.workers)
            for p in problems:
                print(p)
            print(summary)
            return 1 if problems else 0
        elif args.command == "merge":
            from .merge import merge_shard_sets

            m = merge_shard_sets(args.inputs, args.output, overwrite=args.overwrite)
            print(f"wrote {args.output}/manifest.json: {len(args.inputs)} shard set(s), "
                  f"{m['total_docs']:,} documents, {m['total_tokens']:,} tokens in "
                  f"{len(m['shards'])} shard(s)")
        elif args.command == "import-binidx":
            from .binidx import import_binidx
            from .shards import DEFAULT_SHARD_TOKENS

            r = import_binidx(args.input, args.tokenizer, args.output, workers=args.workers,
                              shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                              keep_trailing_eos=args.keep_trailing_eos, eos_token=args.eos_token)
            print(r.summary())
        elif args.command == "inspect":
            from .inspect_shards import inspect_shards

            print(inspect_shards(args.dir, samples=args.samples))
    except (DataError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

