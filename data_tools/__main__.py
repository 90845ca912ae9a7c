"""python -m data_tools {train-tokenizer, tokenize, inspect} — see data_tools/__init__.py."""
from __future__ import annotations

import argparse
import sys

from .errors import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a byte-fallback sentencepiece BPE")
    t.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl(.gz/.zst) files or dirs")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="PREFIX: writes PREFIX.model and PREFIX.json")
    t.add_argument("--text-key", default="text", help="JSONL field holding the text")
    t.add_argument("--max-docs", type=int, default=0, help="train on the first N documents (0: all)")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--no-split-digits", action="store_true", help="let merges span digits")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra user-defined symbols")

    k = sub.add_parser("tokenize", help="tokenize documents into webdataset shards + manifest.json")
    k.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl(.gz/.zst) files or dirs")
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

            docs = read_documents(args.input, args.text_key)
            if args.max_docs:
                docs = islice(docs, args.max_docs)
            path = train_sentencepiece(docs, args.vocab_size, args.output,
                                       model_type=args.model_type,
                                       split_digits=not args.no_split_digits,
                                       user_defined_symbols=args.special_tokens,
                                       record={"inputs": sorted(args.input)})
            print(f"wrote {path} and {path.with_suffix('.json')}")
        elif args.command == "tokenize":
            from .shards import DEFAULT_SHARD_TOKENS, tokenize_files

            result = tokenize_files(args.input, args.tokenizer, args.output, workers=args.workers,
                                    shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                                    text_key=args.text_key, max_doc_tokens=args.max_doc_tokens,
                                    strict=args.strict, eos_token=args.eos_token,
                                    overwrite=args.overwrite,
                                    unit_bytes=int(args.unit_mb * (1 << 20)))
            print(result.summary(args.text_key))
        elif args.command == "inspect":
            from .inspect_shards import inspect_shards

            print(inspect_shards(args.dir, samples=args.samples))
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
