#!/usr/bin/env python
"""Synthetic recall suite: train attention / RWKV-4 / RRWKV on MQAR or distance-controlled recall.

The program is rrwkv.pretrain.cli.recall; `--help` lists its options.
"""
from rrwkv.pretrain.cli.recall import main

if __name__ == "__main__":
    raise SystemExit(main())
