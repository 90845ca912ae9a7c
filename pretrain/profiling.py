"""Where a step's time goes, from torch.profiler: the device kernels and the host-side calls that take
the most time (launch/benchmark.py --profile, benchmarks/profile_model.py)."""
from __future__ import annotations

import time
from typing import Callable, List, Tuple

import torch
from torch.autograd import DeviceType


def profile_table(fn: Callable[[], None], steps: int = 1, top: int = 20, host: bool = True) -> List[str]:
    """Run `fn` `steps` times under the profiler; lines of text, per step: the wall time, the device's
    busy time (sum of kernel times: below the wall time when the GPU waits on the host), the `top`
    kernels by device time and, with `host`, the `top` host-side calls by their own CPU time
    (synchronizations and allocator calls such as cudaFree or cudaStreamSynchronize show up there)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as p:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    averages = p.key_averages()

    def rows(attr: str, on_device: bool) -> List[Tuple[float, float, str]]:
        # kernels are the events on the device; host-side ops carry their kernels' time too (not summed)
        out = [(getattr(ev, attr, 0) / steps / 1e3, ev.count / steps, ev.key) for ev in averages
               if (getattr(ev, "device_type", None) == DeviceType.CUDA) == on_device]
        return sorted((r for r in out if r[0] > 0), reverse=True)

    device = rows("self_device_time_total", True)
    busy = sum(r[0] for r in device)
    lines = [f"  wall {wall:.2f} ms per step" + (f"; device busy {busy:.2f} ms ({busy / wall:.0%} of the wall time)"
                                                 if device else " (no device kernels)")]
    if device:
        lines.append("  top kernels (device ms per step, share of busy time, calls per step):")
        lines += [f"   {t:9.3f} ms {t / busy:6.1%}  x{n:<6g} {key[:110]}" for t, n, key in device[:top]]
    if host:
        lines.append("  top host-side calls (own CPU ms per step, calls per step):")
        lines += [f"   {t:9.3f} ms  x{n:<6g} {key[:110]}" for t, n, key in rows("self_cpu_time_total", False)[:top]]
    return lines
