#!/usr/bin/env python
"""Export a training checkpoint (any ZeRO stage) to a MODEL_DIR: model.safetensors, config.json, tokenizer.

The program is rrwkv.pretrain.cli.export (installed as `rrwkv-export`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
