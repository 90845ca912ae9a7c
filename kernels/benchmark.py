"""Benchmark of the WKV-retrospection kernel (forward + backward), one table from one run on one card.

    python -m rrwkv.kernels.benchmark [--dtype bf16] [--interval 64] [--shapes 8x1024x2048,4x4096x2048,1x16384x2048]
    python -m rrwkv.kernels.benchmark --compile-times      # cold compile and warm load, in fresh processes
    python -m rrwkv.kernels.benchmark --baseline-csrc DIR  # and the kernel of another version of the sources (A/B)
    python -m rrwkv.kernels.benchmark --compare DIR [DIR ...]  # kernel times only: this build against variants

Rows: this kernel with mediums (interval 64) and without (interval 0); flash-linear-attention's
fused_recurrent_rwkv4 when `fla` is importable; the pure-PyTorch reference on GPU tensors; PyTorch
SDPA (causal, head size 128, same width: flash attention); and the memory floor of 18 bytes per
element (read k, v, gy, y-related traffic as the issue counts it) at the bandwidth of a device-to-
device copy measured in the same run. Times are medians over repetitions, CUDA events around each
forward + backward, inputs rotated among several sets so that L2 does not hold them; the rows "as a
CUDA graph" time the same steps captured in a CUDA graph (GPU time per step with the gaps between
kernels, without host overhead: graph_ms).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_fn(fn, sets, warmup=5, rep=30):
    """Median milliseconds of fn(inputs) over `rep` runs, rotating over the input sets."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x = sets[i % len(sets)]
        s.record()
        fn(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def device_us(ev):
    """A profiler event's own device time in microseconds (self_cuda_time_total before torch 2.4)."""
    t = getattr(ev, "self_device_time_total", None)
    return t if t is not None else getattr(ev, "self_cuda_time_total", 0)


def kernel_times(step, sets, steps=5):
    """Device milliseconds per step of each of this op's own CUDA kernels (names k_*), from
    torch.profiler: what the GPU spends in the WKV kernels themselves, without the host-side launch
    and autograd overhead."""
    from torch.profiler import ProfilerActivity, profile as prof
    for i in range(2):
        step(sets[i % len(sets)])
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for i in range(steps):
            step(sets[i % len(sets)])
        torch.cuda.synchronize()
    out = {}
    for ev in p.key_averages():
        if ev.key.startswith("k_"):
            out[ev.key.split("(")[0]] = device_us(ev) / steps / 1e3
    return out


def graph_ms(step, sets, rep=20):
    """GPU milliseconds per step of `step` captured in a CUDA graph (one graph runs it once on each input
    set) and replayed `rep` times back to back, between CUDA events: everything the GPU does for a
    forward + backward, the gaps between its kernels included, without the host's launch and autograd
    time. Kernels that overlap (e.g. with programmatic dependent launch, tried in v20) count once
    here, whereas a sum of the profiler's kernel times counts their overlap twice."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up off the default stream, as graph capture asks
        for i in range(3):
            step(sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in sets:
            step(x)
    graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(rep):
        graph.replay()
    e.record()
    e.synchronize()
    ms = s.elapsed_time(e) / (rep * len(sets))
    del graph
    torch.cuda.empty_cache()
    return ms


def own_kernel_ms(step, sets, steps=5):
    """Device time per step of this op's own CUDA kernels together (kernel_times)."""
    return sum(kernel_times(step, sets, steps).values())


def compare(shapes, dtype, interval, folders):
    """Kernel times (profiler) of this build and of the builds of other source folders (variants of
    kernels/csrc), on the same inputs in one process: the total per shape with its ratio to this
    build, then each kernel's time."""
    from rrwkv.kernels.wkv import wkv_retro
    builds = [("this", None)] + [(f, f) for f in folders]
    per, graph = {}, {}
    for shape in shapes:
        sets = wkv_inputs(*shape, interval, dtype, 3)
        for name, folder in builds:
            with use_csrc(folder):
                per[(name, shape)] = kernel_times(wkv_step(interval, wkv_retro), sets)
                graph[(name, shape)] = graph_ms(wkv_step(interval, wkv_retro), sets)
        del sets
        torch.cuda.empty_cache()
    print(f"\nWKV kernels (profiler), fwd+bwd, {str(dtype).replace('torch.', '')}, s={interval}, ms per step; "
          f"card: {torch.cuda.get_device_name()}; date: {datetime.date.today().isoformat()}")
    print("| build | " + " | ".join(f"({B},{T},{C})" for B, T, C in shapes) + " |")
    print("|" + "---|" * (len(shapes) + 1))
    for name, _ in builds:
        cells = []
        for shape in shapes:
            tot, base = sum(per[(name, shape)].values()), sum(per[("this", shape)].values())
            cells.append(f"{tot:.3f} ({tot / base:.3f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nThe same steps as CUDA graphs (graph_ms: GPU time per fwd+bwd, gaps between kernels included)")
    print("| build | " + " | ".join(f"({B},{T},{C})" for B, T, C in shapes) + " |")
    print("|" + "---|" * (len(shapes) + 1))
    for name, _ in builds:
        print(f"| {name} | " + " | ".join(
            f"{graph[(name, sh)]:.3f} ({graph[(name, sh)] / graph[('this', sh)]:.3f}x)" for sh in shapes) + " |")
    for shape in shapes:
        names = sorted(per[("this", shape)], key=lambda k: -per[("this", shape)][k])
        print(f"per kernel at {shape}: " + "; ".join(
            f"{bn}: " + " ".join(f"{k.replace('k_', '')} {per[(bn, shape)].get(k, 0):.3f}" for k in names)
            for bn, _ in builds))


def copy_bandwidth():
    """Bytes read + written per second of a large device-to-device copy (GB/s)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = time_fn(lambda x: b.copy_(a), [None], warmup=3, rep=20)
    del a, b
    return 2 * n / (ms * 1e-3) / 1e9


def wkv_inputs(B, T, C, s, dtype, n_sets, seed=0, wide_keys=False):
    """Random inputs; keys N(0, 3^2) (as trained models' keys), or with `wide_keys` uniform in
    [-30, 30] (the running maxima change often)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, device="cuda", generator=g)  # noqa: E731
    keys = ((lambda *sh: (torch.rand(*sh, device="cuda", generator=g) * 2 - 1) * 30) if wide_keys
            else (lambda *sh: r(*sh) * 3))
    sets = []
    for _ in range(n_sets):
        td = (r(C) * 1.5 - 1).requires_grad_()
        tf = r(C).requires_grad_()
        k = keys(B, T, C).to(dtype).requires_grad_()
        v = r(B, T, C).to(dtype).requires_grad_()
        gy = r(B, T, C).to(dtype)
        if s:
            J = -(-T // s)
            md = (r(C) * 1.5 - 1).requires_grad_()
            mk = keys(B, J, C).requires_grad_()
            mv = r(B, J, C).requires_grad_()
        else:
            md = mk = mv = None
        sets.append((td, tf, k, v, md, mk, mv, gy))
    return sets


def wkv_step(s, fn):
    def step(x):
        td, tf, k, v, md, mk, mv, gy = x
        y, _ = fn(td, tf, k, v, md, mk, mv, s, None)
        leaves = [t for t in (td, tf, k, v, md, mk, mv) if t is not None]
        torch.autograd.grad(y, leaves, gy)
    return step


def sdpa_inputs(B, T, C, dtype, n_sets):
    H, D = max(C // 128, 1), 128
    out = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        out.append((q, k, v, torch.randn(B, H, T, D, device="cuda", dtype=dtype)))
    return out


def sdpa_step(x):
    q, k, v, go = x
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.autograd.grad(o, (q, k, v), go)


def fla_step():
    """flash-linear-attention's RWKV-4 recurrence on the inputs without mediums, or None and the
    exception that stopped its import.
    fla-core 0.6.0: fused_recurrent_rwkv4(w, u, k, v, state) -> (y, state after the last token), with
    w and u of shape (C,): w is this kernel's time_decay (the op takes -exp(w) itself), u its
    time_first; k, v (B, T, C); state (B, 3, 1, C): alpha, beta, eps, zeros for an empty history."""
    try:
        from fla.ops.rwkv4 import fused_recurrent_rwkv4  # type: ignore
    except Exception as e:  # noqa: BLE001
        return None, e

    def step(x):
        td, tf, k, v, _md, _mk, _mv, gy = x
        state = torch.zeros(k.shape[0], 3, 1, k.shape[2], device=k.device, dtype=torch.float32)
        y, _ = fused_recurrent_rwkv4(td, tf, k, v, state)
        torch.autograd.grad(y, (td, tf, k, v), gy)
    return step, None


class use_csrc:
    """Within: kernels.wkv_retro runs the build of the sources in `folder` (RRWKV_WKV_CSRC), e.g. the
    baseline of an A/B comparison; None: no change."""

    def __init__(self, folder):
        self.folder, self.old = folder, None

    def __enter__(self):
        if self.folder:
            self.old = os.environ.get("RRWKV_WKV_CSRC")
            os.environ["RRWKV_WKV_CSRC"] = str(self.folder)

    def __exit__(self, *exc):
        if self.folder:
            if self.old is None:
                os.environ.pop("RRWKV_WKV_CSRC", None)
            else:
                os.environ["RRWKV_WKV_CSRC"] = self.old


def bench(shapes, dtype, interval, rep, baseline=None):
    from rrwkv.kernels.wkv import wkv_retro
    from rrwkv.kernels.reference import wkv_retro_reference
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    esize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    notes = {}     # "row: Type: message" of a failed row -> the shapes it failed at; printed under the table

    def failed(row, e, shape):   # the table's cell; the message goes under the table
        why = "".join(traceback.format_exception_only(type(e), e)).strip()
        notes.setdefault(f"{row}: {why}", []).append("(%d,%d,%d)" % shape)
        return f"failed ({type(e).__name__}, see below)"

    fla, fla_error = fla_step()
    for (B, T, C) in shapes:
        n_sets = 3
        res = {}
        sets_m = wkv_inputs(B, T, C, interval, dtype, n_sets)
        res["kernel, mediums (s=%d)" % interval] = time_fn(wkv_step(interval, wkv_retro), sets_m, rep=rep)
        res["  its CUDA kernels only (profiler)"] = own_kernel_ms(wkv_step(interval, wkv_retro), sets_m)
        res["  the step as a CUDA graph (GPU time, gaps included)"] = graph_ms(wkv_step(interval, wkv_retro), sets_m)
        if baseline:     # the same rows for the baseline sources, on the same inputs, in this process
            with use_csrc(baseline):
                res["baseline sources, mediums (s=%d)" % interval] = time_fn(wkv_step(interval, wkv_retro), sets_m,
                                                                           rep=rep)
                res["  baseline's CUDA kernels only (profiler)"] = own_kernel_ms(wkv_step(interval, wkv_retro), sets_m)
                res["  baseline's step as a CUDA graph"] = graph_ms(wkv_step(interval, wkv_retro), sets_m)
            res["  ratio of CUDA kernel times, this / baseline"] = (res["  its CUDA kernels only (profiler)"] /
                                                                    res["  baseline's CUDA kernels only (profiler)"])
            res["  ratio of CUDA graph times, this / baseline"] = (
                res["  the step as a CUDA graph (GPU time, gaps included)"] / res["  baseline's step as a CUDA graph"])
        del sets_m
        sets_w = wkv_inputs(B, T, C, interval, dtype, n_sets, wide_keys=True)
        res["kernel, mediums, keys in [-30, 30]"] = time_fn(wkv_step(interval, wkv_retro), sets_w, rep=rep)
        del sets_w
        sets_0 = wkv_inputs(B, T, C, 0, dtype, n_sets)
        res["kernel, no mediums (s=0)"] = time_fn(wkv_step(0, wkv_retro), sets_0, rep=rep)
        res["  its CUDA kernels only (profiler) "] = own_kernel_ms(wkv_step(0, wkv_retro), sets_0)
        if fla is not None:
            try:
                res["fla fused_recurrent_rwkv4"] = time_fn(fla, sets_0, rep=rep)
            except Exception as e:  # noqa: BLE001
                if not notes:   # the whole traceback once, on stderr
                    traceback.print_exc()
                res["fla fused_recurrent_rwkv4"] = failed("fla fused_recurrent_rwkv4", e, (B, T, C))
        else:
            failed("fla fused_recurrent_rwkv4 (import)", fla_error, (B, T, C))
            res["fla fused_recurrent_rwkv4"] = f"not importable ({type(fla_error).__name__}, see below)"
        del sets_0
        try:
            sets_r = wkv_inputs(B, T, C, interval, dtype, 1)
            res["reference (PyTorch) on GPU, s=%d" % interval] = time_fn(
                wkv_step(interval, wkv_retro_reference), sets_r, warmup=1, rep=3)
            del sets_r
        except torch.OutOfMemoryError:
            res["reference (PyTorch) on GPU, s=%d" % interval] = "out of memory"
        torch.cuda.empty_cache()
        sets_a = sdpa_inputs(B, T, C, dtype, n_sets)
        res["SDPA causal, head 128 (flash)"] = time_fn(sdpa_step, sets_a, rep=rep)
        res["  SDPA as a CUDA graph"] = graph_ms(sdpa_step, sets_a)
        del sets_a
        torch.cuda.empty_cache()
        res["memory floor (18 B/elt at copy bw)"] = 18 * (esize / 2) * B * T * C / (bw * 1e9) * 1e3
        rows.append(((B, T, C), res))
    date = datetime.date.today().isoformat()
    print(f"\nWKV fwd+bwd, {str(dtype).replace('torch.', '')}, median ms; card: {dev}; date: {date}; "
          f"copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}"
          + (f"; baseline sources: {baseline}" if baseline else ""))
    names = list(rows[0][1])
    head = "| " + " | ".join(["what"] + [f"({B},{T},{C})" for (B, T, C), _ in rows]) + " |"
    print(head)
    print("|" + "---|" * (len(rows) + 1))
    for n in names:
        cells = []
        for _, res in rows:
            x = res[n]
            cells.append(f"{x:.3f}" if isinstance(x, float) else str(x))
        print("| " + " | ".join([n] + cells) + " |")
    for why, at in notes.items():
        print(f"{why}  [at {', '.join(at)}]")


def profile(shapes, dtype, interval, steps=5):
    """Per-kernel device time of one forward + backward (torch.profiler), to see where time goes."""
    from torch.profiler import ProfilerActivity, profile as prof
    from rrwkv.kernels.wkv import wkv_retro
    for (B, T, C) in shapes:
        sets = wkv_inputs(B, T, C, interval, dtype, 2)
        step = wkv_step(interval, wkv_retro)
        for i in range(3):
            step(sets[i % 2])
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for i in range(steps):
                step(sets[i % 2])
            torch.cuda.synchronize()
        rows = []
        for ev in p.key_averages():
            t = device_us(ev)
            if t > 0:
                rows.append((t / steps, ev.count // steps, ev.key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"profile ({B},{T},{C}) s={interval}: device busy {total / 1e3:.3f} ms per fwd+bwd")
        for t, n, key in rows[:10]:
            print(f"   {t / 1e3:8.4f} ms  x{n}  {key[:90]}")
        del sets


def compile_times(dtype_name, cache_dir=None):
    """Cold compile (empty cache) and warm load (cache filled), each in a fresh process."""
    code = ("import time, torch; t=time.time(); from rrwkv.kernels import build; "
            f"build.load_wkv_extension(torch.{str(DTYPES[dtype_name]).replace('torch.', '')}); "
            "print('LOAD_SECONDS', time.time()-t)")
    with tempfile.TemporaryDirectory() as d:
        if cache_dir:                      # keep the cache (e.g. for the tests that follow)
            d = cache_dir
            if os.path.isdir(d) and os.listdir(d):
                raise SystemExit(f"--cache-dir {d} must be empty or new to time a cold compile")
        env = dict(os.environ, RRWKV_KERNEL_CACHE=d)
        out = {}
        for what in ("cold", "warm"):
            t = time.time()
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            wall = time.time() - t
            if p.returncode != 0:
                print(p.stdout, p.stderr)
                raise SystemExit(f"{what} load failed")
            inner = float([ln for ln in p.stdout.splitlines() if ln.startswith("LOAD_SECONDS")][0].split()[1])
            out[what] = (inner, wall)
        print(f"compile ({dtype_name}): cold load_wkv_extension {out['cold'][0]:.1f} s "
              f"(process {out['cold'][1]:.1f} s); warm {out['warm'][0]:.2f} s (process {out['warm'][1]:.1f} s, "
              f"includes importing torch)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--shapes", default="8x1024x2048,4x4096x2048,1x16384x2048")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--compile-times", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel device times instead of the table")
    ap.add_argument("--cache-dir", default=None, help="with --compile-times: cache to fill (empty or new)")
    ap.add_argument("--steps-only", type=int, default=0, metavar="N",
                    help="run N forward + backward steps at the first shape and nothing else: a program for a "
                         "profiler such as ncu (the first step compiles and warms up)")
    ap.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                    help="only the kernel times (profiler) of this build and of the builds of these source folders "
                         "(variants of kernels/csrc), on the same inputs, with their ratios")
    ap.add_argument("--baseline-csrc", default=None, metavar="DIR",
                    help="also time the kernel built from another version of kernels/csrc (e.g. "
                         "`git archive main kernels/csrc | tar -x -C /tmp/base`, then /tmp/base/kernels/csrc) on the "
                         "same inputs in the same run, and the ratio of the two kernels' times")
    a = ap.parse_args(argv)
    if a.compile_times:
        compile_times(a.dtype, a.cache_dir)
        return
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    if a.profile:
        profile(shapes, DTYPES[a.dtype], a.interval)
        return
    if a.compare:
        compare(shapes, DTYPES[a.dtype], a.interval, a.compare)
        return
    if a.steps_only:
        from rrwkv.kernels.wkv import wkv_retro
        B, T, C = shapes[0]
        x = wkv_inputs(B, T, C, a.interval, DTYPES[a.dtype], 1)[0]
        for _ in range(a.steps_only):
            wkv_step(a.interval, wkv_retro)(x)
        torch.cuda.synchronize()
        return
    if a.baseline_csrc:
        from rrwkv.kernels import build
        try:
            with use_csrc(a.baseline_csrc):
                build.csrc_dir(build.WKV_SOURCES + build.WKV_HEADERS)   # a bad folder: one error, before timing
        except build.KernelBuildError as e:
            raise SystemExit(f"error: {e}")
    bench(shapes, DTYPES[a.dtype], a.interval, a.rep, a.baseline_csrc)


if __name__ == "__main__":
    main()
