#!/usr/bin/env python
"""Pretrain an RRWKV model.

The program is rrwkv.pretrain.cli.train (installed as `rrwkv-pretrain`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
