#!/usr/bin/env python
"""Convert RWKV-4 weights into MODEL_DIRs (interval 0) and interval-0 MODEL_DIRs into Hugging Face RWKV.

The program is rrwkv.pretrain.cli.convert (installed as `rrwkv-convert`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
