"""Pretrain an RRWKV model.

    deepspeed [--num_gpus N | --hostfile FILE] launch/pretrain.py --config configs/X.yaml [key=value ...]
    rrwkv-pretrain --config configs/X.yaml [key=value ...]          # one process (same as python launch/pretrain.py)

Exit status: 0 done; 2 bad input (one line on stderr); 75 stopped by SIGTERM/SIGUSR1 after saving a
checkpoint (OUT_DIR/REQUEUE written: start the same command again to continue); 3 too many
non-finite steps in a row (the last good checkpoint is kept).
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional, Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def catch_signals_early() -> List[int]:
    """Record SIGTERM / SIGUSR1 from now on: one that arrives while torch and DeepSpeed load would
    otherwise kill the process without a checkpoint. The training loop's StopRequest takes them over."""
    caught: List[int] = []
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    return caught


def parser() -> argparse.ArgumentParser:
    from rrwkv.pretrain.config import describe_keys
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=describe_keys(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="YAML config; repeat to merge several in order")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 (keys below)")
    return p


def parse_config(argv: Sequence[str]):
    """The merged, validated config of a command line (raises ConfigError)."""
    args = parser().parse_intermixed_args(list(argv))   # --config files and key=value overrides in any order
    from rrwkv.pretrain.config import load_config
    return load_config(args.config, args.overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    early = catch_signals_early()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser().parse_intermixed_args(argv)          # --help and usage errors before the slow imports
    from rrwkv.pretrain.cli.common import run_main   # torch: seconds to load

    def run(args: Sequence[str]) -> int:
        from rrwkv.pretrain.train import train
        return train(parse_config(args), early)

    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
