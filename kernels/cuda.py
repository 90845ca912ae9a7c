"""CUDA backend of kernels.wkv_retro: the compiled kernel (kernels/csrc) behind an autograd.Function.

wkv_retro_cuda(...) returns exactly what the reference returns: y (B, T, C) in k's dtype and the
WKVState after the chunk (float32 tensors). Gradients flow to time_decay, time_first, k, v,
medium_decay, mk, mv and to the incoming state's tensors (aa, bb, pp, ma, mb, mp; the gradient of a
running maximum pp/mp is the one the reference gives, g_aa * aa + g_bb * bb, and the outgoing
maxima are not differentiable, as in the reference).
Inputs: float32, bfloat16, float16 (arithmetic in float32); float64 CUDA inputs go to the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import build
from .reference import wkv_retro_reference
from .state import WKVState

def set_cache_dir(path: Optional[str]) -> None:
    """Cache directory for the compiled kernel (the config's hook; see kernels/build.py)."""
    build.set_cache_dir(path)


_ext_by_key = {}


def _ext(dtype: torch.dtype, device: torch.device):
    key = (dtype, device.type, device.index, build.cache_settings())   # runs on every call: no Path
    ext = _ext_by_key.get(key)
    if ext is None:
        if device.type == "cpu":       # the kernels' arithmetic built for the CPU (tests)
            ext = _ext_by_key[key] = build.load_wkv_host_extension(dtype)
        else:
            with torch.cuda.device(device):
                ext = _ext_by_key[key] = build.load_wkv_extension(dtype)
    return ext


class _WKVRetro(torch.autograd.Function):
    """Inputs: interval, phase, then float32 (C,) parameters, k/v in their dtype, float32 mediums and
    state tensors; an empty (numel 0) state tensor means a fresh state."""

    @staticmethod
    def forward(ctx, interval, phase, td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp):
        ext = _ext(k.dtype, k.device)
        y, aaT, bbT, ppT, maT, mbT, mpT, cs, ms = ext.forward(td, tf, k, v, md, mk, mv, aa, bb, pp,
                                                              ma, mb, mp, interval, phase)
        ctx.interval, ctx.phase = interval, phase
        ctx.save_for_backward(td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms)
        ctx.mark_non_differentiable(ppT, mpT)
        ctx.set_materialize_grads(False)
        return y, aaT, bbT, ppT, maT, mbT, mpT

    @staticmethod
    def backward(ctx, gy, gaaT, gbbT, _gppT, gmaT, gmbT, _gmpT):
        td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms = ctx.saved_tensors
        none = k.new_empty(0, dtype=torch.float32)
        opt = lambda g: none if g is None else g.float().contiguous()  # noqa: E731
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        ext = _ext(k.dtype, k.device)
        grads = ext.backward(td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms,
                             gy, opt(gaaT), opt(gbbT), opt(gmaT), opt(gmbT), ctx.interval, ctx.phase)
        need = ctx.needs_input_grad[2:]
        return (None, None) + tuple(g if n else None for g, n in zip(grads, need))


def wkv_retro_cuda(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   medium_decay: Optional[torch.Tensor], mk: Optional[torch.Tensor], mv: Optional[torch.Tensor],
                   interval: int, state: Optional[WKVState]) -> Tuple[torch.Tensor, WKVState]:
    """kernels.wkv_retro on CUDA tensors (arguments already validated by kernels.wkv).

    Given CPU tensors it runs the CPU build of the kernels' arithmetic (build.load_wkv_host_extension):
    the same chunking, scans and backward, for testing the kernel without a GPU (slow)."""
    B, T, C = k.shape
    if k.dtype not in build.DTYPE_IDS or T == 0 or B == 0 or C == 0:
        return wkv_retro_reference(time_decay, time_first, k, v, medium_decay, mk, mv, interval, state)
    dev = k.device
    def f32(t):
        if t.dtype == torch.float32 and t.device == dev and t.is_contiguous():
            return t
        return t.to(device=dev, dtype=torch.float32).contiguous()
    empty = k.new_empty(0, dtype=torch.float32)
    phase = int(state.phase) if (state is not None and interval > 0) else 0
    kk = k.contiguous()
    vv = v.to(k.dtype).contiguous()
    if state is None:
        st = (empty,) * 6
    else:
        st = (f32(state.aa), f32(state.bb), f32(state.pp)) + (
            (f32(state.ma), f32(state.mb), f32(state.mp)) if interval > 0 else (empty,) * 3)
    if interval > 0:
        md_, mk_, mv_ = f32(medium_decay), f32(mk), f32(mv)
    else:
        md_ = mk_ = mv_ = empty
    y, aaT, bbT, ppT, maT, mbT, mpT = _WKVRetro.apply(
        int(interval), phase, f32(time_decay), f32(time_first), kk, vv, md_, mk_, mv_, *st)
    if interval > 0:
        new = WKVState(aaT, bbT, ppT, maT, mbT, mpT, (phase + T) % interval)
    else:
        new = WKVState(aaT, bbT, ppT, None, None, None, 0)
    return y, new
