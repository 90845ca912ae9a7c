"""Training-step benchmark of any config, with an equal-parameter SDPA transformer timed in the same run.

    python launch/benchmark.py --config configs/tiny.yaml --config configs/model/1b5.yaml \\
        data.seq_len=4096 data.micro_batch_size=2 train.precision=bf16 --steps 10 --warmup 3 [--json FILE]
    deepspeed --num_gpus 4 launch/benchmark.py ...        # data parallel or pipeline, as training runs it

For each model: tokens/s and TFLOP/s per GPU from the median of `--steps` whole optimizer steps
(no synchronization inside a step, as training runs), MFU against the card's dense bf16 peak and
against the bf16 matmul rate measured in the same run (HFU too with activation checkpointing), peak
memory of every rank, the warmup's wall time (torch.compile and the kernel build happen there), and
from `--phase-steps` further steps, each phase synchronized, the seconds in data / forward /
backward / optimizer (means). Pipeline layouts report, per stage, the time in forward and backward compute
and the rest of the step (the bubble, point-to-point transfers, the optimizer), beside the
schedule's bubble (P-1)/(m+P-1). Batches are random tokens (`--data config` reads the configured
data). `model.compile=true` compiles the transformer's blocks too, so both run the same way;
`--also-compiled` times each model eager and then compiled in one run. On one process, a model that
runs out of GPU memory is reported as such and the other is still timed.
"""
import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path


import torch

from rrwkv.pretrain.cli.common import run_main
from rrwkv.pretrain.cli.train import parse_config
from rrwkv.pretrain.config import model_config
from rrwkv.pretrain.data.sources import micro_batches, prepare_data, train_batches
from rrwkv.pretrain.distributed import start
from rrwkv.pretrain.errors import UserError
from rrwkv.pretrain.parallelize import apply_block_options, build_engine, build_model, compile_blocks
from rrwkv.pretrain.runfiles import memory_stats
from rrwkv.pretrain.baseline import SDPATransformer
from rrwkv.pretrain.engine import is_pipeline, train_step
from rrwkv.pretrain.plan import make_plan
from rrwkv.pretrain.metrics import count_params, device_peak, flops_per_token
from rrwkv.pretrain.profiling import profile_table


def measured_matmul_peak(device: torch.device) -> float:
    if device.type != "cuda":
        from rrwkv.pretrain.metrics import measured_cpu_peak
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


def instrument_pipeline(engine, sync):
    """Time this stage's forward and backward passes (its compute) while `busy["on"]`."""
    from deepspeed.runtime.pipe import schedule
    busy = {"on": False, "forward": 0.0, "backward": 0.0}
    table = dict(type(engine)._INSTRUCTION_MAP)

    def timed(fn, key):
        def run(self, *args, **kwargs):
            if not busy["on"]:
                return fn(self, *args, **kwargs)
            sync()
            t = time.perf_counter()
            out = fn(self, *args, **kwargs)
            sync()
            busy[key] += time.perf_counter() - t
            return out
        return run

    table[schedule.ForwardPass] = timed(table[schedule.ForwardPass], "forward")
    table[schedule.BackwardPass] = timed(table[schedule.BackwardPass], "backward")
    engine._INSTRUCTION_MAP = table   # the engine looks its instructions up on itself
    return busy


def time_steps(engine, batches, steps: int, device: torch.device, l2wrap: bool, phases: bool, busy=None):
    """Per-step seconds over `steps` training steps (engine.train_step, as training runs them): the
    median step (and data time); with `phases`, the mean of each phase, synchronized (means, so that
    the phases add up to the step)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    keys = ("data", "forward", "backward", "optimizer", "step") if phases else ("data", "step")
    out = {k: [] for k in keys}
    if busy is not None:
        out.update(stage_forward=[], stage_backward=[])
        busy["on"] = phases
    for _ in range(steps):
        t = {k: 0.0 for k in out}
        sync()
        t0 = time.perf_counter()
        micro = batches()
        t["data"] = time.perf_counter() - t0
        last = [time.perf_counter()]

        def on_phase(name):             # each phase's end, synchronized; the copy to the device is no phase
            sync()
            now = time.perf_counter()
            if name != "data":
                t[name] += now - last[0]
            last[0] = now

        if busy is not None:
            busy["forward"] = busy["backward"] = 0.0
        train_step(engine, micro, device, l2wrap=l2wrap, on_phase=on_phase if phases else None)
        sync()
        if busy is not None:
            t["stage_forward"], t["stage_backward"] = busy["forward"], busy["backward"]
        t["step"] = time.perf_counter() - t0
        for k in out:
            out[k].append(t[k])
    if busy is not None:
        busy["on"] = False
    average = statistics.mean if phases else statistics.median
    return {k: average(v) for k, v in out.items() if v}


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    import torch.distributed as tdist
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    objs = [None] * tdist.get_world_size()
    tdist.all_gather_object(objs, obj)
    return objs


def dynamo_graphs() -> int:
    """Graphs torch.compile has captured in this process so far (0 for an eager run)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def make_sdpa(cfg, mcfg, T):
    sdpa = SDPATransformer(mcfg.vocab_size, mcfg.n_layer, mcfg.n_embd, ffn_mult=mcfg.ffn_mult)
    apply_block_options(cfg, sdpa)          # model.compile and activation checkpointing, as for RRWKV
    return sdpa, sdpa.flops_per_token(T), sum(q.numel() for q in sdpa.parameters())


def run(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, kernel build, allocator)")
    p.add_argument("--phase-steps", type=int, default=3, help="further steps with each phase synchronized")
    p.add_argument("--data", choices=["random", "config"], default="random")
    p.add_argument("--no-sdpa", action="store_true", help="skip the transformer comparison")
    p.add_argument("--also-compiled", action="store_true",
                   help="time each model eager, then with its blocks compiled, in this one run (model.compile=false)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step of each model (torch.profiler): its top "
                        "device kernels and host-side calls, printed and kept in the JSON")
    args, rest = p.parse_known_args(argv)
    if min(args.steps, args.phase_steps) < 1 or args.warmup < 0:
        raise UserError("--steps and --phase-steps must be >= 1 and --warmup >= 0")
    cfg = parse_config(rest)
    dist = start(cfg)
    mcfg = model_config(cfg)
    t_start = time.perf_counter()
    plan = make_plan(cfg, dist.world_size, dist.rank, dist.device)
    model = build_model(cfg, plan, dist)
    dist.say(f"benchmark: model built and initialized in {time.perf_counter() - t_start:.1f} s")
    T, M = cfg.data.seq_len, plan.micro_batch_size
    gen = torch.Generator().manual_seed(cfg.run.seed + plan.dp_rank)
    if args.data == "config":
        steps = micro_batches(train_batches(cfg, prepare_data(cfg, dist), plan), M)
        batches = functools.partial(next, steps)
    else:
        def batches():
            ids = torch.randint(0, mcfg.vocab_size, (plan.grad_accum, M, T + 1), generator=gen)
            return [(b[:, :-1], b[:, 1:]) for b in ids]
    peak, peak_name = device_peak(dist.device, cfg.train.peak_tflops)
    matmul = measured_matmul_peak(dist.device)
    step_tokens = plan.global_batch_size * T
    stages = cfg.parallel.pipeline_stages
    if args.also_compiled and (cfg.model.compile or cfg.parallel.zero_stage == 3):
        raise UserError("--also-compiled times each model eager and then compiled: give model.compile=false, "
                          "and parallel.zero_stage 0-2 (ZeRO-3 must know before its engine is built)")
    sync = (lambda: torch.cuda.synchronize(dist.device)) if dist.device.type == "cuda" else (lambda: None)

    def measure(engine, name, flops, params):
        """Warmup, timed steps and phase steps of one model as it is now (eager or compiled)."""
        if dist.device.type == "cuda":    # peaks and retries of this model's steps only
            torch.cuda.reset_peak_memory_stats(dist.device)
            torch.cuda.reset_accumulated_memory_stats(dist.device)
        busy = instrument_pipeline(engine, sync) if is_pipeline(engine) else None
        l2 = cfg.train.l2wrap and name.startswith("rrwkv")
        t0 = time.perf_counter()
        for i in range(args.warmup):   # one at a time, so that a slow start shows where it is
            time_steps(engine, batches, 1, dist.device, l2, phases=False)
            dist.say(f"benchmark: {name}: warm-up step {i + 1}/{args.warmup} done at "
                           f"{time.perf_counter() - t0:.1f} s")
        warmup_s = time.perf_counter() - t0
        t = time_steps(engine, batches, args.steps, dist.device, l2, phases=False)
        ph = time_steps(engine, batches, args.phase_steps, dist.device, l2, phases=True, busy=busy)
        tps = step_tokens / t["step"]
        per_dev = tps * flops / dist.world_size
        stats = gather(memory_stats(dist.device))
        mem = [m.get("mem_gb") for m in stats]
        r = {"params": params, "tokens_per_s": tps, "tflops_per_device": per_dev / 1e12,
             "mfu": per_dev / peak, "mfu_vs_measured_matmul": per_dev / matmul, "flops_per_token": flops,
             "step_s": t["step"], "warmup_s": warmup_s, "seconds": ph, "mem_gb": max(x or 0 for x in mem),
             "mem_gb_per_rank": mem, "param_tensors": sum(1 for _ in engine.module.parameters()),
             "param_groups": len(engine.optimizer.param_groups)}
        if dist.device.type == "cuda":   # the allocator's view: reserved peak, and retries (cache flushes)
            r["mem_reserved_gb_per_rank"] = [m["mem_reserved_gb"] for m in stats]
            r["alloc_retries_per_rank"] = [m["alloc_retries"] for m in stats]
            if max(r["alloc_retries_per_rank"]):
                dist.say(f"warning: {name}: the CUDA caching allocator ran out of free blocks "
                               f"{max(r['alloc_retries_per_rank'])} times (each a cache flush and a device "
                               "synchronization): its times are slowed by a full or fragmented card")
        if args.profile:   # a diagnostic: if the profiler fails, the figures above still stand
            try:
                lines = profile_table(lambda: time_steps(engine, batches, 1, dist.device, l2, phases=False), top=15)
            except Exception as e:  # noqa: BLE001
                lines = [f"  profile failed: {type(e).__name__}: {e}"]
            r["profile"] = lines
            dist.say(f"profile of one {name} step (rank 0):\n" + "\n".join(lines))
        if cfg.train.activation_checkpointing:   # the recomputed forward: 8N instead of 6N per token
            r["hfu"] = r["mfu"] * 8 / 6
        if busy is not None:
            P, mb = stages, plan.grad_accum
            stage = {"stage": engine.stage_id, "forward_s": ph["stage_forward"], "backward_s": ph["stage_backward"],
                     "step_s": ph["step"]}
            stage["idle_frac"] = 1 - (stage["forward_s"] + stage["backward_s"]) / stage["step_s"]
            per_rank = gather(stage)
            r["pipeline"] = {"stages": P, "micro_batches": mb, "schedule_bubble": (P - 1) / (mb + P - 1),
                             "per_rank": per_rank,
                             "max_idle_frac": max(s["idle_frac"] for s in per_rank),
                             "min_idle_frac": min(s["idle_frac"] for s in per_rank)}
        return r

    models = ["rrwkv"] + (["sdpa_transformer"] if not args.no_sdpa and stages == 1 else [])
    results, names = {}, []
    for name in models:
        if name == "rrwkv":
            m, flops, params = model, flops_per_token(mcfg), count_params(mcfg)
        else:
            m, flops, params = make_sdpa(cfg, mcfg, T)
        t_engine = time.perf_counter()
        engine = build_engine(m, cfg, plan)
        dist.say(f"benchmark: {name}: engine built in {time.perf_counter() - t_engine:.1f} s")
        for variant in ([name, name + "_compiled"] if args.also_compiled else [name]):
            if variant.endswith("_compiled"):
                compile_blocks(m)
            names.append(variant)
            graphs = dynamo_graphs()
            try:
                results[variant] = measure(engine, variant, flops, params)
                results[variant]["dynamo_graphs"] = dynamo_graphs() - graphs   # compiled during this model's steps
            except torch.cuda.OutOfMemoryError as e:   # one process: keep the other models' figures
                if dist.world_size > 1:
                    raise
                results[variant] = {"error": "out of memory: " + str(e).splitlines()[0],
                                    **memory_stats(dist.device)}
                dist.say(f"{variant}: out of memory")
                break
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, m
        model = None   # drop RRWKV before the transformer is built: its weights must not count there
        gc.collect()
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    for suffix in ("", "_compiled"):
        a, b = results.get("rrwkv" + suffix, {}), results.get("sdpa_transformer" + suffix, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            results["rrwkv_over_sdpa_tokens_per_s" + suffix] = a["tokens_per_s"] / b["tokens_per_s"]
    header = {"device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "world_size": dist.world_size, "peak": peak_name,
              "measured_matmul_tflops": matmul / 1e12, "seq_len": T, "micro_batch": M,
              "grad_accum": plan.grad_accum, "global_batch": plan.global_batch_size,
              "precision": cfg.train.precision, "zero_stage": cfg.parallel.zero_stage, "pipeline_stages": stages,
              "offload": cfg.parallel.offload, "activation_checkpointing": cfg.train.activation_checkpointing,
              "compile": cfg.model.compile, "fused_adam": cfg.optim.fused_adam,
              "bucket_size": cfg.parallel.bucket_size, "steps": args.steps, "warmup": args.warmup}
    if dist.is_main:
        print(json.dumps(header))
        print(f"{'model':<26}{'tokens/s':>12}{'TFLOP/s/dev':>13}{'MFU':>8}{'MFU(meas)':>11}{'mem GB':>8}"
              f"{'data':>8}{'fwd':>8}{'bwd':>8}{'opt':>8}{'step s':>8}{'warmup s':>10}")
        for name in names:
            r = results[name]
            if "error" in r:
                print(f"{name:<26}{r['error']}")
                continue
            s = r["seconds"]
            print(f"{name:<26}{r['tokens_per_s']:>12.0f}{r['tflops_per_device']:>13.2f}{r['mfu']:>8.1%}"
                  f"{r['mfu_vs_measured_matmul']:>11.1%}{r['mem_gb']:>8.1f}{s['data']:>8.3f}"
                  f"{s.get('forward', 0):>8.3f}{s.get('backward', 0):>8.3f}{s.get('optimizer', 0):>8.3f}"
                  f"{r['step_s']:>8.3f}{r['warmup_s']:>10.1f}")
            if "pipeline" in r:
                pl = r["pipeline"]
                print(f"pipeline: {pl['stages']} stages, {pl['micro_batches']} micro-batches per step; schedule bubble "
                      f"{pl['schedule_bubble']:.1%}; time outside forward/backward per stage "
                      + ", ".join(f"stage {s['stage']} {s['idle_frac']:.1%}" for s in pl["per_rank"]))
        for suffix in ("", "_compiled"):
            if "rrwkv_over_sdpa_tokens_per_s" + suffix in results:
                print(f"RRWKV / SDPA tokens/s{' (both compiled)' if suffix else ''}: "
                      f"{results['rrwkv_over_sdpa_tokens_per_s' + suffix]:.2f}x")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"setup": header, "results": results}, indent=1))
    return 0


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)
