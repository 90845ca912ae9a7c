"""Export a training checkpoint (any ZeRO stage) to a MODEL_DIR: model.safetensors, config.json, tokenizer.

    python launch/export.py --checkpoint OUT_DIR --output MODEL_DIR [--dtype bf16|fp32] [--tag stepN]
"""
import sys
from pathlib import Path


from rrwkv.pretrain.cli.common import ArgumentParser, run_main
from rrwkv.pretrain.export import export_checkpoint


def run(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the training run's OUT_DIR (or OUT_DIR/checkpoints/stepN)")
    p.add_argument("--output", required=True, help="the MODEL_DIR to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' dtype (fp32: exact)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step1000 (default: the one `latest` names)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one of the run's data.train)")
    args = p.parse_args(argv)
    out, info = export_checkpoint(Path(args.checkpoint), Path(args.output), args.dtype, args.tag, args.tokenizer)
    print(f"exported {info['tag_dir']} (step {info['step']}, model {info['config']}) to {out} as {args.dtype}, "
          f"tokenizer {info['tokenizer'].name}")


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)
