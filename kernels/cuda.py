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


def _ext(dtype: torch.dtype):
    return build.load_wkv_extension(dtype)


class _WKVRetro(torch.autograd.Function):
    @staticmethod
    def forward(ctx, interval, phase, td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp):
        ext = _ext(k.dtype)
        y, aaT, bbT, ppT, maT, mbT, mpT, cs, ms = ext.forward(td, tf, k, v, md, mk, mv, aa, bb, pp,
                                                              ma, mb, mp, interval, phase)
        ctx.interval, ctx.phase = interval, phase
        ctx.save_for_backward(td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms)
        ctx.mark_non_differentiable(ppT, mpT)
        return y, aaT, bbT, ppT, maT, mbT, mpT

    @staticmethod
    def backward(ctx, gy, gaaT, gbbT, _gppT, gmaT, gmbT, _gmpT):
        td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms = ctx.saved_tensors
        B, T, C = k.shape
        z = lambda g, like: torch.zeros_like(like) if g is None else g.float().contiguous()  # noqa: E731
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        gaaT, gbbT = z(gaaT, ppT), z(gbbT, ppT)
        gmaT, gmbT = z(gmaT, mpT), z(gmbT, mpT)
        ext = _ext(k.dtype)
        (gtd, gtf, gk, gv, gmd, gmk, gmv, gaa, gbb, gpp, gma, gmb, gmp) = ext.backward(
            td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms,
            gy, gaaT, gbbT, gmaT, gmbT, ctx.interval, ctx.phase)
        if ctx.interval == 0:
            gmd = gmk = gmv = gma = gmb = gmp = None
        return (None, None, gtd, gtf, gk, gv, gmd, gmk, gmv, gaa, gbb, gpp, gma, gmb, gmp)


def wkv_retro_cuda(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   medium_decay: Optional[torch.Tensor], mk: Optional[torch.Tensor], mv: Optional[torch.Tensor],
                   interval: int, state: Optional[WKVState]) -> Tuple[torch.Tensor, WKVState]:
    """kernels.wkv_retro on CUDA tensors (arguments already validated by kernels.wkv)."""
    B, T, C = k.shape
    if k.dtype not in build.DTYPE_IDS or T == 0 or B == 0 or C == 0:
        return wkv_retro_reference(time_decay, time_first, k, v, medium_decay, mk, mv, interval, state)
    dev = k.device
    f32 = lambda t: t.to(device=dev, dtype=torch.float32).contiguous()  # noqa: E731
    if state is None:
        state = WKVState.fresh(B, C, interval, torch.float32, dev)
    phase = int(state.phase) if interval > 0 else 0
    kk = k.contiguous()
    vv = v.to(k.dtype).contiguous()
    empty = k.new_zeros(0, dtype=torch.float32)
    if interval > 0:
        med = (f32(medium_decay), f32(mk), f32(mv), f32(state.ma), f32(state.mb), f32(state.mp))
    else:
        med = (empty, empty, empty, empty, empty, empty)
    md_, mk_, mv_, ma_, mb_, mp_ = med
    y, aaT, bbT, ppT, maT, mbT, mpT = _WKVRetro.apply(
        int(interval), phase, f32(time_decay), f32(time_first), kk, vv, md_, mk_, mv_,
        f32(state.aa), f32(state.bb), f32(state.pp), ma_, mb_, mp_)
    if interval > 0:
        new = WKVState(aaT, bbT, ppT, maT, mbT, mpT, (phase + T) % interval)
    else:
        new = WKVState(aaT, bbT, ppT, None, None, None, 0)
    return y, new
