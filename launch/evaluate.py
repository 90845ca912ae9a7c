#!/usr/bin/env python
"""Evaluate an exported model: loss, perplexity and loss by position within documents on a shard

The program is rrwkv.pretrain.cli.evaluate (installed as `rrwkv-evaluate`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
