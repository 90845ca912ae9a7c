#!/usr/bin/env python
"""Start a training run's ranks on this node so that a stop request reaches all of them.

The program is rrwkv.pretrain.cli.launch (installed as `rrwkv-launch`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
