#!/usr/bin/env python
"""Where a training step's GPU time goes: per-kernel device time of one forward + backward of RRWKV and
of the equal-parameter SDPA transformer (bf16 weights, random tokens, no optimizer, no DeepSpeed).

    python benchmarks/profile_model.py --layers 4 --width 2048 --batch 2 --seq 4096 --interval 64 [--compile]

Prints, per model, the synchronized forward and backward milliseconds (median of --steps) and the
kernels that take the most device time, grouped by name, per forward + backward. Beside
launch/benchmark.py --profile (the same step inside the DeepSpeed engine), it separates the model's
own GPU time from what the engine adds.
"""
import argparse
import statistics
import sys
import time


import torch

from rrwkv.pretrain.baseline import SDPATransformer
from rrwkv.pretrain.loss import lm_loss
from rrwkv.pretrain.parallelize import compile_blocks
from rrwkv.pretrain.model import RRWKV, RRWKVConfig
from rrwkv.pretrain.profiling import profile_table


def timed_passes(model, idx, steps):
    fwd, bwd = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(idx)
        loss = lm_loss(out[0] if isinstance(out, tuple) else out, idx)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    return statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also profile each model with its blocks compiled (model.compile=true's regions)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: profile_model.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    idx = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    cfg = RRWKVConfig(vocab_size=a.vocab, n_layer=a.layers, n_embd=a.width, ctx_len=a.seq,
                      medium_interval=a.interval)
    models = [("rrwkv", lambda: RRWKV(cfg, init_seed=0))]
    if not a.no_sdpa:
        models.append(("sdpa_transformer", lambda: SDPATransformer(a.vocab, a.layers, a.width)))
    if a.compile:
        models += [(name + "_compiled", make) for name, make in models]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: {a.layers} layers x {a.width}, "
          f"vocab {a.vocab}, batch {a.batch} x {a.seq}, interval {a.interval}, bf16 weights")
    for name, make in models:
        model = make().to(device=dev, dtype=torch.bfloat16).train()
        if name.endswith("_compiled"):
            compile_blocks(model)
        timed_passes(model, idx, 2)                       # warm-up: kernel build, allocator, autotune
        f, b = timed_passes(model, idx, a.steps)
        print(f"{name}: forward {f:.2f} ms, backward {b:.2f} ms (backward / forward {b / f:.2f})", flush=True)

        def step():
            out = model(idx)
            lm_loss(out[0] if isinstance(out, tuple) else out, idx).backward()
        print("\n".join(profile_table(step, a.steps, a.top, host=False)))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
