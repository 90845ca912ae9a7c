"""Convert models between MODEL_DIRs and Hugging Face (RRWKV of any interval; RWKV-4) or BlinkDL's RWKV-4 .pth.

    python launch/convert.py --to hf-rrwkv --input MODEL_DIR --output HF_DIR      # any interval, trust_remote_code
    python launch/convert.py --from hf-rrwkv --input HF_DIR --output MODEL_DIR    # and back, bit for bit
    python launch/convert.py --from hf-rwkv --input HF_DIR --output MODEL_DIR
    python launch/convert.py --from rwkv4-pth --input FILE.pth --output MODEL_DIR [--tokenizer 20B_tokenizer.json]
    python launch/convert.py --to hf-rwkv --input MODEL_DIR --output HF_DIR       # interval 0: RwkvForCausalLM
"""
import sys
from pathlib import Path


from rrwkv.pretrain.cli.common import ArgumentParser, number, run_main
from rrwkv.pretrain.convert import convert, describe


def run(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="frm", choices=["hf-rrwkv", "hf-rwkv", "rwkv4-pth"], default=None)
    p.add_argument("--to", choices=["hf-rrwkv", "hf-rwkv"], default=None)
    p.add_argument("--input", required=True, help="HF_DIR, FILE.pth, or (with --to) a MODEL_DIR")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer file when none lies beside the input")
    p.add_argument("--ctx-len", type=number(int, 1), default=1024, help="ctx_len to record for a .pth (it does not store one)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the weights written (default: as stored for hf-rrwkv, else fp32)")
    args = p.parse_args(argv)
    config = convert((args.frm, args.to), Path(args.input), Path(args.output), args.tokenizer, args.ctx_len,
                     args.dtype)
    print(f"wrote {args.output} ({describe(config)})")


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)
