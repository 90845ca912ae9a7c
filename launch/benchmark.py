#!/usr/bin/env python
"""Training-step benchmark of any config, with an equal-parameter SDPA transformer timed in the same run.

The program is rrwkv.pretrain.cli.benchmark (installed as `rrwkv-benchmark`); `--help` lists its options.
"""
from rrwkv.pretrain.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
