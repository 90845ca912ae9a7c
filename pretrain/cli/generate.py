"""Sample a continuation of a prompt from an exported model, in recurrent mode, streamed to stdout.

    python launch/generate.py --model MODEL_DIR --prompt TEXT --max-new-tokens N
        [--temperature 1.0 --top-k 0 --top-p 1.0 --seed S --device cpu|cuda --dtype fp32|bf16]
"""
import sys
import time
from pathlib import Path


from rrwkv.pretrain.cli.common import ArgumentParser, number, run_main
from rrwkv.pretrain.export import load_model, load_tokenizer, parse_dtype
from rrwkv.pretrain.generation import Sampling, TextStream, default_dtype, generate, pick_device


def run(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MODEL_DIR (launch/export.py or launch/convert.py)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=200)
    p.add_argument("--temperature", type=number(float, 0), default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=number(int, 0), default=0, help="0 = off")
    p.add_argument("--top-p", type=number(float, 0, 1, open_low=True), default=1.0, help="1 = off")
    p.add_argument("--seed", type=number(int, 0, 2 ** 64 - 1), default=None, help="same seed, same device: same text")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 | fp64 (default: bf16 on GPUs, fp32 on CPUs)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--no-doc-start", action="store_true",
                   help="do not put the end-of-document token before the prompt (training puts one before every document)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)[0]
    model = load_model(Path(args.model), device, dtype)
    tok = load_tokenizer(Path(args.model))
    prompt = ([] if args.no_doc_start else [tok.eos_id]) + tok.encode(args.prompt)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    stream = TextStream(tok.decode)
    t0 = time.perf_counter()
    first, n = None, 0
    for token in generate(model, prompt, args.max_new_tokens, sampling, args.seed,
                          stop_ids=() if args.ignore_eos else (tok.eos_id,)):
        if first is None:
            first = time.perf_counter()                   # prompt prefilled, first token drawn
        n += 1
        if token == tok.eos_id and not args.ignore_eos:
            break
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    end = time.perf_counter()
    first = first or end
    rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    print(f"[{len(prompt)} prompt tokens in {first - t0:.2f}s; {n} new tokens, {rate:.1f} tokens/s "
          f"on {device.type} ({str(dtype).replace('torch.', '')})]", file=sys.stderr)


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)
