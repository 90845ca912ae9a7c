"""Pure-PyTorch WKV with retrospection (rrwkv.md), for CPU training, tests and as the CUDA kernel's oracle.

Log-space throughout: every sum of exponentials is carried as (a, b, p) with a running maximum p
(RWKV-4's aa/bb/pp trick), so keys of magnitude 60 and more neither overflow nor underflow.
Time is processed in chunks of CHUNK positions: inside a chunk all pairwise terms are formed at
once (a (B, L, L, C) tensor), across chunks the state is carried. No per-token Python work.
Autograd provides the backward; running maxima are detached since the represented sums do not
depend on them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .state import NEG, WKVState, state_dtype

CHUNK = 16

Triple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def decayed_scan(w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, init: Triple,
                 chunk: int = CHUNK) -> Tuple[Triple, Triple]:
    """Exclusive decayed sums S_n = exp(-n w) S_0 + sum_{i<n} exp(-(n-1-i) w + k_i) v_i.

    w: (C,) decay rate per step (> 0); k, v: (B, N, C); init: (a, b, p) each (B, C).
    Returns ((a, b, p) each (B, N, C): the state before each position; (a, b, p) (B, C): after N).
    """
    B, N, C = k.shape
    a0, b0, p0 = init
    outs = []
    for s0 in range(0, N, chunk):
        kc, vc = k[:, s0:s0 + chunk], v[:, s0:s0 + chunk]
        L = kc.shape[1]
        n = torch.arange(L, device=k.device, dtype=k.dtype)
        # lw[b, n, i, c] = -(n-1-i) w + k_i for i < n: weight of token i in the sum seen at n.
        dist = (n[:, None] - 1 - n[None, :])
        lw = kc[:, None, :, :] - dist[None, :, :, None] * w
        causal = (n[None, :] < n[:, None])[None, :, :, None]
        lw = lw.masked_fill(~causal, NEG)
        lp = p0[:, None, :] - n[None, :, None] * w                     # initial state at n
        m = torch.maximum(lw.amax(2), lp).detach()                      # (B, L, C)
        e = torch.exp(lw - m[:, :, None])
        ep = torch.exp(lp - m)
        a = torch.einsum("bnic,bic->bnc", e, vc) + a0[:, None] * ep
        b = e.sum(2) + b0[:, None] * ep
        outs.append((a, b, m))
        # State after the chunk (position L).
        lwf = kc - (L - 1 - n)[None, :, None] * w
        lpf = p0 - L * w
        mf = torch.maximum(lwf.amax(1), lpf).detach()
        ef = torch.exp(lwf - mf[:, None])
        epf = torch.exp(lpf - mf)
        a0 = (ef * vc).sum(1) + a0 * epf
        b0 = ef.sum(1) + b0 * epf
        p0 = mf
    if not outs:
        empty = k.new_zeros(B, 0, C)
        return (empty, empty, empty), (a0, b0, p0)
    cat = lambda i: torch.cat([o[i] for o in outs], 1)  # noqa: E731
    return (cat(0), cat(1), cat(2)), (a0, b0, p0)


def wkv_retro_reference(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, medium_decay: Optional[torch.Tensor] = None,
                        mk: Optional[torch.Tensor] = None, mv: Optional[torch.Tensor] = None,
                        interval: int = 0, state: Optional[WKVState] = None,
                        chunk: int = CHUNK) -> Tuple[torch.Tensor, WKVState]:
    """y (B, T, C) in k's dtype and the state after the chunk; see kernels.wkv_retro."""
    B, T, C = k.shape
    cdt = state_dtype(k.dtype)
    if state is None:
        state = WKVState.fresh(B, C, interval, cdt, k.device)
    phase = state.phase
    ew = torch.exp(time_decay.to(cdt))
    u = time_first.to(cdt)
    kf, vf = k.to(cdt), v.to(cdt)
    (a, b, p), (fa, fb, fp) = decayed_scan(ew, kf, vf, (state.aa.to(cdt), state.bb.to(cdt), state.pp.to(cdt)), chunk)

    # Terms of the sum: previous tokens (a, b, p), the bonus of the token itself, the mediums.
    lu = u + kf
    m = torch.maximum(p, lu)
    if interval > 0:
        ewm = torch.exp(medium_decay.to(cdt))
        J = mk.shape[1]
        (ma, mb, mp), (fma, fmb, fmp) = decayed_scan(
            ewm, mk.to(cdt), mv.to(cdt), (state.ma.to(cdt), state.mb.to(cdt), state.mp.to(cdt)), chunk)
        seg = torch.div(torch.arange(T, device=k.device) + phase, interval, rounding_mode="floor")
        ma_t, mb_t, mp_t = ma[:, seg], mb[:, seg], mp[:, seg]           # (B, T, C)
        m = torch.maximum(m, mp_t).detach()
    else:
        m = m.detach()
    ep, eu = torch.exp(p - m), torch.exp(lu - m)
    num = a * ep + eu * vf
    den = b * ep + eu
    if interval > 0:
        em = torch.exp(mp_t - m)
        num = num + ma_t * em
        den = den + mb_t * em
        complete = (phase + T) // interval
        if complete < J:       # the last segment is still in progress: its medium is not folded in
            fma, fmb, fmp = ma[:, J - 1], mb[:, J - 1], mp[:, J - 1]
        new = WKVState(fa, fb, fp, fma, fmb, fmp, (phase + T) % interval)
    else:
        new = WKVState(fa, fb, fp, None, None, None, 0)
    return (num / den).to(k.dtype), new
