#!/usr/bin/env python
"""Sample a continuation of a prompt from an exported model, in recurrent mode, streamed to stdout.

The program is rrwkv.pretrain.cli.generate (installed as `rrwkv-generate`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
