#!/usr/bin/env python
"""Convert models between MODEL_DIRs and Hugging Face (RRWKV of any interval; RWKV-4) or BlinkDL's RWKV-4 .pth.

The program is rrwkv.pretrain.cli.convert (installed as `rrwkv-convert`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
