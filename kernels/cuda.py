"""CUDA backend of kernels.wkv_retro: the compiled kernel (kernels/csrc) as torch.library custom ops
(inside torch.compile) and an autograd.Function (eager).

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
from torch import Tensor

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


# The kernel as two torch.library custom ops with an autograd formula and shape functions ("fake"
# implementations), so that torch.compile traces through the op instead of breaking its graph there:
# a compiled block is one graph, WKV included (pretrain/parallelize.py). Eager calls go through the
# autograd.Function below instead (the same extension calls, less host time).
# Inputs: interval, phase, then float32 (C,) parameters, k/v in their dtype, float32 mediums and state
# tensors; an empty (numel 0) state tensor means a fresh state (an empty gradient: zero).

def geometry(T: int, interval: int, phase: int) -> Tuple[int, int]:
    """(NC, J) of csrc/wkv.h's wkv_make_geo: the number of time chunks the forward saves a state for,
    and of mediums. The shape functions below need them; tests check them against the built op."""
    if interval == 0:
        return -(-T // CHUNK), 0
    q_last = phase + T - 1
    J = -(-(phase + T) // interval)
    if interval <= CHUNK:
        return q_last // (interval * (CHUNK // interval)) + 1, J
    nsub = -(-interval // CHUNK)
    L = -(-interval // nsub)
    j = q_last // interval
    return j * nsub + (q_last - j * interval) // L - phase // L + 1, J


CHUNK = 64   # WKV_CH of csrc/wkv.h


@torch.library.custom_op("rrwkv::wkv_forward", mutates_args=())
def wkv_forward_op(td: Tensor, tf: Tensor, k: Tensor, v: Tensor, md: Tensor, mk: Tensor, mv: Tensor,
                   aa: Tensor, bb: Tensor, pp: Tensor, ma: Tensor, mb: Tensor, mp: Tensor,
                   interval: int, phase: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                       Tensor, Tensor]:
    """y, the outgoing state (aa, bb, pp, ma, mb, mp), and the chunk and medium states the backward needs."""
    c = lambda t: t.contiguous()  # noqa: E731  (a compiled graph may hand over other strides)
    out = _ext(k.dtype, k.device).forward(c(td), c(tf), c(k), c(v), c(md), c(mk), c(mv), c(aa), c(bb), c(pp),
                                          c(ma), c(mb), c(mp), interval, phase)
    return tuple(out)


@wkv_forward_op.register_fake
def _(td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, interval, phase):
    B, T, C = k.shape
    NC, J = geometry(T, interval, phase)
    f32 = lambda *shape: k.new_empty(shape, dtype=torch.float32)  # noqa: E731
    Cm = C if interval > 0 else 0
    return (torch.empty_like(k), f32(B, C), f32(B, C), f32(B, C), f32(B, Cm), f32(B, Cm), f32(B, Cm),
            f32(3, B, NC, C), f32(3, B, J, C))


@torch.library.custom_op("rrwkv::wkv_backward", mutates_args=())
def wkv_backward_op(td: Tensor, tf: Tensor, k: Tensor, v: Tensor, md: Tensor, mk: Tensor, mv: Tensor,
                    aa: Tensor, bb: Tensor, pp: Tensor, ma: Tensor, mb: Tensor, mp: Tensor,
                    ppT: Tensor, mpT: Tensor, cs: Tensor, ms: Tensor, gy: Tensor, gaaT: Tensor, gbbT: Tensor,
                    gmaT: Tensor, gmbT: Tensor, interval: int, phase: int
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of time_decay, time_first, k, v, medium_decay, mk, mv, and of the incoming state
    (aa, bb, pp, ma, mb, mp) stacked as one (6, B, C) tensor."""
    c = lambda t: t.contiguous()  # noqa: E731
    g = _ext(k.dtype, k.device).backward(*(c(t) for t in (td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp,
                                                           ppT, mpT, cs, ms, gy, gaaT, gbbT, gmaT, gmbT)),
                                         interval, phase)
    return tuple(g[:7]) + (torch.stack(g[7:]),)   # the six state gradients are views of one buffer


@wkv_backward_op.register_fake
def _(td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms, gy, gaaT, gbbT, gmaT, gmbT,
      interval, phase):
    B, T, C = k.shape
    J = geometry(T, interval, phase)[1]
    Cm = C if interval > 0 else 0
    f32 = lambda *shape: k.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (f32(C), f32(C), torch.empty_like(k), torch.empty_like(k), f32(Cm), f32(B, J, Cm), f32(B, J, Cm),
            f32(6, B, C))


def _save(ctx, inputs, ppT, mpT, cs, ms, interval, phase) -> None:
    ctx.interval, ctx.phase = interval, phase
    ctx.save_for_backward(*inputs, ppT, mpT, cs, ms)


def _input_grads(ctx, gy, gaaT, gbbT, gmaT, gmbT, needs, in_graph: bool):
    """Gradients of the 13 tensor inputs (None where not needed). The outgoing maxima (pp, mp) and the
    saved chunk states are not differentiable, as in the reference: their gradients are not taken."""
    td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms = ctx.saved_tensors
    none = k.new_empty(0, dtype=torch.float32)
    opt = lambda g: none if g is None else g.float().contiguous()  # noqa: E731
    gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
    args = (td, tf, k, v, md, mk, mv, aa, bb, pp, ma, mb, mp, ppT, mpT, cs, ms, gy, opt(gaaT), opt(gbbT),
            opt(gmaT), opt(gmbT), ctx.interval, ctx.phase)
    if in_graph:
        *first, gst = torch.ops.rrwkv.wkv_backward(*args)
        grads = tuple(first) + tuple(gst.unbind(0))
    else:
        grads = tuple(_ext(k.dtype, k.device).backward(*args))
    return tuple(g if n else None for g, n in zip(grads, needs))


def _setup_context(ctx, inputs, output):
    *tensors, interval, phase = inputs
    _y, _aaT, _bbT, ppT, _maT, _mbT, mpT, cs, ms = output
    _save(ctx, tensors, ppT, mpT, cs, ms, interval, phase)


def _backward(ctx, gy, gaaT, gbbT, _gppT, gmaT, gmbT, _gmpT, _gcs, _gms):
    return _input_grads(ctx, gy, gaaT, gbbT, gmaT, gmbT, ctx.needs_input_grad[:13], in_graph=True) + (None, None)


wkv_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _WKVRetro(torch.autograd.Function):
    """The eager path: the same extension calls without the custom op's dispatch, which costs about
    0.3 ms of host time per forward + backward (measured on the CPU build, 2026-11-27), per layer and
    micro-batch. Inputs as the custom op's, with interval and phase first."""

    @staticmethod
    def forward(ctx, interval, phase, *tensors):
        y, aaT, bbT, ppT, maT, mbT, mpT, cs, ms = _ext(tensors[2].dtype, tensors[2].device).forward(
            *tensors, interval, phase)
        _save(ctx, tensors, ppT, mpT, cs, ms, interval, phase)
        ctx.mark_non_differentiable(ppT, mpT)
        ctx.set_materialize_grads(False)
        return y, aaT, bbT, ppT, maT, mbT, mpT

    @staticmethod
    def backward(ctx, gy, gaaT, gbbT, _gppT, gmaT, gmbT, _gmpT):
        return (None, None) + _input_grads(ctx, gy, gaaT, gbbT, gmaT, gmbT, ctx.needs_input_grad[2:], in_graph=False)


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
    tensors = (f32(time_decay), f32(time_first), kk, vv, md_, mk_, mv_, *st)
    if torch.compiler.is_compiling():   # inside torch.compile: the custom op, a node of the graph
        y, aaT, bbT, ppT, maT, mbT, mpT, _cs, _ms = torch.ops.rrwkv.wkv_forward(*tensors, int(interval), phase)
    else:
        y, aaT, bbT, ppT, maT, mbT, mpT = _WKVRetro.apply(int(interval), phase, *tensors)
    if interval > 0:
        new = WKVState(aaT, bbT, ppT, maT, mbT, mpT, (phase + T) % interval)
    else:
        new = WKVState(aaT, bbT, ppT, None, None, None, 0)
    return y, new
