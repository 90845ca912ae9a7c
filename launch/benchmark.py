#!/usr/bin/env python
"""Training-step benchmark of any config, with an equal-parameter SDPA transformer timed in the same run.

    python launch/benchmark.py --config configs/tiny.yaml --config configs/model/1b5.yaml \\
        data.seq_len=4096 data.micro_batch_size=4 train.precision=bf16 --steps 20 --warmup 5 [--json FILE]
    deepspeed --num_gpus 4 launch/benchmark.py ...        # data parallel, as training runs it

Prints tokens/s, TFLOP/s per GPU, MFU against the card's dense bf16 peak and against the matmul
rate measured in the same run, peak memory, and the time in data / forward / backward / optimizer
(each phase synchronized). Batches are random tokens (`--data config` reads the configured data).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain import run as R  # noqa: E402
from pretrain.baseline import SDPATransformer  # noqa: E402
from pretrain.engine import batch_layout, build_engine, is_pipeline, lm_loss  # noqa: E402
from pretrain.metrics import count_params, device_peak, flops_per_token  # noqa: E402


def measured_matmul_peak(device: torch.device) -> float:
    if device.type != "cuda":
        from pretrain.metrics import measured_cpu_peak
        return measured_cpu_peak()
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t0)


def time_steps(engine, batches, steps: int, warmup: int, device: torch.device, l2wrap: bool):
    """Per-step seconds of each phase over `steps` timed steps after `warmup`."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    phases = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(warmup + steps):
        t = {k: 0.0 for k in phases}
        sync()
        t0 = time.perf_counter()
        micro = batches()
        t["data"] = time.perf_counter() - t0
        if is_pipeline(engine):
            t1 = time.perf_counter()
            engine.train_batch(data_iter=iter(micro))
            sync()
            t["forward"] = time.perf_counter() - t1   # the pipeline schedule interleaves the phases
        else:
            for x, y in micro:
                x, y = x.to(device), y.to(device)
                t1 = time.perf_counter()
                loss = lm_loss(engine(x), y, l2wrap)
                sync()
                t2 = time.perf_counter()
                engine.backward(loss)
                sync()
                t3 = time.perf_counter()
                engine.step()
                sync()
                t4 = time.perf_counter()
                t["forward"] += t2 - t1
                t["backward"] += t3 - t2
                t["optimizer"] += t4 - t3
        t["step"] = time.perf_counter() - t0
        if i >= warmup:
            for k in phases:
                phases[k].append(t[k])
    return {k: statistics.median(v) for k, v in phases.items()}


def main(argv):
    p = argparse.ArgumentParser(prog="launch/benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", choices=["random", "config"], default="random")
    p.add_argument("--no-sdpa", action="store_true", help="skip the transformer comparison")
    p.add_argument("--json", default=None, help="also write the results here")
    args, rest = p.parse_known_args(argv)
    cfg = R.parse_config(rest, prog="launch/benchmark.py")
    dist = R.init(cfg)
    mcfg = R.model_config(cfg)
    model, dp_rank = R.build_model(cfg, dist)
    layout = batch_layout(cfg, R.data_parallel_size(cfg, dist), dp_rank)
    T, M = cfg.data.seq_len, layout.micro_batch_size
    gen = torch.Generator().manual_seed(cfg.run.seed + dp_rank)
    if args.data == "config":
        lanes = R.train_batches(cfg, R.prepare_data(cfg, dist), layout)
        batches = lanes.next_step
    else:
        def batches():
            ids = torch.randint(0, mcfg.vocab_size, (layout.grad_accum, M, T + 1), generator=gen)
            return [(b[:, :-1], b[:, 1:]) for b in ids]
    peak, peak_name = device_peak(dist.device, cfg.train.peak_tflops)
    matmul = measured_matmul_peak(dist.device)
    step_tokens = layout.global_batch_size * T
    results = {}
    candidates = [("rrwkv", model, flops_per_token(mcfg))]
    if not args.no_sdpa and cfg.parallel.pipeline_stages == 1:
        sdpa = SDPATransformer(mcfg.vocab_size, mcfg.n_layer, mcfg.n_embd, ffn_mult=mcfg.ffn_mult)
        candidates.append(("sdpa_transformer", sdpa, sdpa.flops_per_token(T)))
    for name, m, flops in candidates:
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        engine = build_engine(m, cfg, layout, dist.device)
        t = time_steps(engine, batches, args.steps, args.warmup, dist.device, cfg.train.l2wrap and name == "rrwkv")
        tps = step_tokens / t["step"]
        per_dev = tps * flops / dist.world_size
        params = count_params(mcfg) if name == "rrwkv" else sum(q.numel() for q in m.parameters())
        results[name] = {"params": params, "tokens_per_s": tps, "tflops_per_device": per_dev / 1e12,
                         "mfu": per_dev / peak, "mfu_vs_measured_matmul": per_dev / matmul,
                         "flops_per_token": flops, "seconds": t, **R.memory_stats(dist.device)}
        del engine
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    if "sdpa_transformer" in results:
        ratio = results["rrwkv"]["tokens_per_s"] / results["sdpa_transformer"]["tokens_per_s"]
        results["rrwkv_over_sdpa_tokens_per_s"] = ratio
    header = {"device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
              "world_size": dist.world_size, "peak": peak_name, "measured_matmul_tflops": matmul / 1e12,
              "seq_len": T, "global_batch": layout.global_batch_size, "precision": cfg.train.precision,
              "zero_stage": cfg.parallel.zero_stage, "pipeline_stages": cfg.parallel.pipeline_stages,
              "activation_checkpointing": cfg.train.activation_checkpointing}
    if dist.is_main:
        print(json.dumps(header))
        print(f"{'model':<18}{'tokens/s':>12}{'TFLOP/s/dev':>13}{'MFU':>8}{'MFU(meas)':>11}{'mem GB':>8}"
              f"{'data':>8}{'fwd':>8}{'bwd':>8}{'opt':>8}{'step s':>8}")
        for name in ("rrwkv", "sdpa_transformer"):
            if name in results:
                r, s = results[name], results[name]["seconds"]
                print(f"{name:<18}{r['tokens_per_s']:>12.0f}{r['tflops_per_device']:>13.2f}{r['mfu']:>8.1%}"
                      f"{r['mfu_vs_measured_matmul']:>11.1%}{r.get('mem_gb', 0):>8.1f}{s['data']:>8.3f}"
                      f"{s['forward']:>8.3f}{s['backward']:>8.3f}{s['optimizer']:>8.3f}{s['step']:>8.3f}")
        if "rrwkv_over_sdpa_tokens_per_s" in results:
            print(f"RRWKV / SDPA tokens/s: {results['rrwkv_over_sdpa_tokens_per_s']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({"setup": header, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(R.run_main(main, sys.argv[1:]))
