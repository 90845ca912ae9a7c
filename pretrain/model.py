"""RRWKV: RWKV-4 with retrospection (mediums) and an excitation gate. The math is rrwkv.md's.

One file, one module per idea: TimeMix (token shift, WKV with mediums), ChannelMix (gated by the
excitation of the previous segment), Block, RRWKV. No DeepSpeed here: parallelism lives in
pretrain/engine.py and pretrain/pipeline.py.

Three ways to run (all give the same logits): `model(idx)` (parallel), `model(idx, state,
return_state=True)` (chunks of any length with carried state) and `model.step(idx_t, state)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from rrwkv.kernels.wkv import WKVState, num_mediums, wkv_retro


@dataclass
class RRWKVConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 128
    ctx_len: int = 256
    medium_interval: int = 64        # s; 0 = plain RWKV-4 (no mediums, no excitation)
    se_reduction: int = 16           # excitation hidden width = n_embd // se_reduction
    ffn_mult: int = 4                # channel-mix hidden width = ffn_mult * n_embd

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "ctx_len", "se_reduction", "ffn_mult"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.medium_interval < 0:
            raise ValueError(f"model.medium_interval must be >= 0 (0 = RWKV-4), got {self.medium_interval}")
        if self.medium_interval > 0 and self.n_embd // self.se_reduction < 1:
            raise ValueError(f"model.se_reduction ({self.se_reduction}) must be <= model.n_embd ({self.n_embd})")

    @classmethod
    def from_dict(cls, d: dict) -> "RRWKVConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RRWKVConfig fields {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def se_hidden(self) -> int:
        return max(1, self.n_embd // self.se_reduction)


@dataclass
class LayerState:
    """Per-layer recurrent state (rrwkv.md, 'Three ways to run')."""
    att_x: torch.Tensor                      # (B, C) last time-mix input (token shift)
    ffn_x: torch.Tensor                      # (B, C) last channel-mix input
    wkv: WKVState                            # token and medium WKV sums, and the phase
    att_sum: Optional[torch.Tensor] = None   # (B, C) sum of time-mix inputs of the segment in progress
    ffn_sum: Optional[torch.Tensor] = None   # (B, C) same for channel-mix inputs
    gate: Optional[torch.Tensor] = None      # (B, C) channel-mix gate of the segment in progress

    @property
    def phase(self) -> int:
        return self.wkv.phase


@dataclass
class RRWKVState:
    layers: List[LayerState] = field(default_factory=list)

    def detach(self) -> "RRWKVState":
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return RRWKVState([LayerState(d(l.att_x), d(l.ffn_x), l.wkv.detach(), d(l.att_sum),
                                      d(l.ffn_sum), d(l.gate)) for l in self.layers])


def token_shift(x: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
    """x_{t-1} for each t: (B, T, C); `last` (B, C) is the carried previous input (zeros if None)."""
    if last is None:
        return F.pad(x, (0, 0, 1, -1))   # one op: every position moves down one, zeros at t = 0
    return torch.cat([last[:, None].to(x.dtype), x[:, :-1]], dim=1)


def mix(xx: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x * m + xx * (1 - m) as one multiply-add, xx + d * m, where d = x - xx is computed once per shift."""
    return torch.addcmul(xx, d, m)


def segment_means(x: torch.Tensor, carried_sum: Optional[torch.Tensor], phase: int, interval: int):
    """Means of x over the segments this chunk touches, and the running sum of the last one.

    x: (B, T, C) starting `phase` positions into a segment whose earlier inputs sum to
    `carried_sum`. Returns (means (B, J, C), sum of the segment in progress at the end (B, C)).
    A segment still in progress is averaged over the positions seen so far (its medium is used by
    no token of this chunk).
    """
    B, T, C = x.shape
    J = num_mediums(phase, T, interval)
    if phase == 0 and T % interval == 0:  # whole segments (training windows): a reshape, no padding
        return x.view(B, J, interval, C).mean(2), x.new_zeros(B, C)
    padded = x.new_zeros(B, J * interval, C)
    padded[:, phase:phase + T] = x
    sums = padded.view(B, J, interval, C).sum(2)
    if carried_sum is not None and phase > 0:
        sums = torch.cat([sums[:, :1] + carried_sum[:, None].to(x.dtype), sums[:, 1:]], 1)
    filled = torch.full((J,), float(interval), dtype=x.dtype, device=x.device)
    filled[-1] = (phase + T) - (J - 1) * interval
    means = sums / filled[None, :, None]
    end = (phase + T) % interval
    running = sums[:, -1] if end != 0 else torch.zeros_like(sums[:, -1])
    return means, running


def per_segment(x: torch.Tensor, g: torch.Tensor, phase: int, interval: int) -> torch.Tensor:
    """x (B, T, C) times the gate of each position's segment, g[:, (phase + t) // interval]; g: (B, >=J, C)."""
    B, T, C = x.shape
    if phase == 0 and T % interval == 0:  # whole segments: a broadcast, no gather (nor scatter in backward)
        J = T // interval
        return (x.view(B, J, interval, C) * g[:, :J, None]).view(B, T, C)
    # Otherwise padded out to whole segments, broadcast, and cut back: still no index gather, whose
    # backward (a scatter-add) inductor's CPU code got wrong for lengths that are no multiple of the
    # interval (an out-of-bounds abort, torch 2.13, 2026-11-27).
    J = num_mediums(phase, T, interval)
    padded = F.pad(x, (0, 0, phase, J * interval - phase - T))
    return (padded.view(B, J, interval, C) * g[:, :J, None]).view(B, J * interval, C)[:, phase:phase + T]


class Excitation(nn.Module):
    """sigmoid(W2 relu(W1 m)) of squeeze-and-excitation, on segment summaries (B, J, C)."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(F.relu(self.down(m))))


class TimeMix(nn.Module):
    def __init__(self, cfg: RRWKVConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.interval = cfg.medium_interval
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        if self.interval > 0:
            self.medium_decay = nn.Parameter(torch.zeros(C))
            self.excite = Excitation(C, cfg.se_hidden)

    # Time-mix runs in three steps, project -> wkv -> out, which Block calls around the WKV op (so that
    # the parts around the kernel can be compiled; pretrain/parallelize.py): it has no forward of its own.
    def project(self, x: torch.Tensor, st: Optional[LayerState]):
        """x: (B, T, C) after ln1. Token shift, the three mixes, k/v/r; squeeze and excitation of the
        segments, their mk/mv. Returns k, v, r (B, T, C), mk, mv (B, J, C) (None at interval 0) and
        the new att_sum."""
        xx = token_shift(x, None if st is None else st.att_x)
        d = x - xx
        xk, xv, xr = mix(xx, d, self.time_mix_k), mix(xx, d, self.time_mix_v), mix(xx, d, self.time_mix_r)
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        if self.interval == 0:
            return k, v, r, None, None, None
        phase = 0 if st is None else st.phase
        m, att_sum = segment_means(x, None if st is None else st.att_sum, phase, self.interval)
        me = m * self.excite(m)                          # squeeze, then excite
        return k, v, r, self.key(me), self.value(me), att_sum  # the tokens' own key/value modules

    def wkv(self, k, v, mk, mv, st: Optional[LayerState]):
        """The WKV op (CUDA kernel or reference): y (B, T, C) and the new WKV state."""
        wkv_state = None if st is None else st.wkv
        if self.interval > 0:
            return wkv_retro(self.time_decay, self.time_first, k, v, self.medium_decay, mk, mv, self.interval,
                             wkv_state)
        return wkv_retro(self.time_decay, self.time_first, k, v, state=wkv_state)

    def out(self, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.output(torch.sigmoid(r) * y)


class ChannelMix(nn.Module):
    def __init__(self, cfg: RRWKVConfig, layer_id: int):
        super().__init__()
        C, H = cfg.n_embd, cfg.ffn_mult * cfg.n_embd
        self.interval = cfg.medium_interval
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, H, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(H, C, bias=False)
        if self.interval > 0:
            self.excite = Excitation(C, cfg.se_hidden)

    def gates(self, y: torch.Tensor, st: Optional[LayerState]):
        """Gates of the segments this chunk touches g (B, J+1, C) (g[:, 0]: the segment in progress at
        its start), the running sum, and the gate of the segment in progress at its end."""
        s = self.interval
        B, T, C = y.shape
        phase = 0 if st is None else st.phase
        c, running = segment_means(y, None if st is None else st.ffn_sum, phase, s)
        g_first = y.new_ones(B, 1, C) if st is None or st.gate is None else st.gate[:, None].to(y.dtype)
        g = torch.cat([g_first, 2 * self.excite(c)], 1)  # g[j+1] from c[j]; (B, J+1, C)
        J = c.shape[1]
        gate_next = g[:, J] if (phase + T) % s == 0 else g[:, J - 1]
        return g, running, gate_next

    def forward(self, y: torch.Tensor, st: Optional[LayerState]):
        yy = token_shift(y, None if st is None else st.ffn_x)
        d = y - yy
        yk, yr = mix(yy, d, self.time_mix_k), mix(yy, d, self.time_mix_r)
        out = torch.sigmoid(self.receptance(yr)) * self.value(torch.square(F.relu(self.key(yk))))
        ffn_sum = gate = None
        if self.interval > 0:
            g, ffn_sum, gate = self.gates(y, st)
            out = per_segment(out, g, 0 if st is None else st.phase, self.interval)
        return out, y[:, -1], ffn_sum, gate


class Block(nn.Module):
    def __init__(self, cfg: RRWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x: torch.Tensor, st: Optional[LayerState] = None):
        """x: (B, T, C) -> (B, T, C) and this layer's new state."""
        if self.layer_id == 0:
            x = self.ln0(x)
        return self.run(x, st)

    def run(self, x: torch.Tensor, st: Optional[LayerState]):
        """The block after ln0: time-mix around the WKV op, then channel-mix. pretrain/parallelize.py compiles
        this whole function, WKV op included (a torch.library custom op on CUDA), into one graph that every
        block shares (it reads nothing that differs between blocks, such as layer_id)."""
        k, v, r, mk, mv, att_x, att_sum = self.before_wkv(x, st)
        y, wkv = self.att.wkv(k, v, mk, mv, st)
        x, ffn_x, ffn_sum, gate = self.after_wkv(x, r, y, st)
        return x, LayerState(att_x, ffn_x, wkv, att_sum, ffn_sum, gate)

    # The two halves of time-mix and channel-mix around the WKV op.
    def before_wkv(self, x: torch.Tensor, st: Optional[LayerState]):
        h = self.ln1(x)
        k, v, r, mk, mv, att_sum = self.att.project(h, st)
        return k, v, r, mk, mv, h[:, -1], att_sum

    def after_wkv(self, x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, st: Optional[LayerState]):
        x = x + self.att.out(r, y)
        f, ffn_x, ffn_sum, gate = self.ffn(self.ln2(x), st)
        return x + f, ffn_x, ffn_sum, gate


class RRWKV(nn.Module):
    def __init__(self, cfg: RRWKVConfig, init_seed: Optional[int] = 0):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if init_seed is not None:  # None: leave uninitialized (meta-device shape inspection, loading)
            self.init_weights(init_seed)

    # ---- initialization (RWKV-4's, rrwkv.md) ----
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """RWKV-4 initialization; each layer draws from its own seed so any layout gets the same weights."""
        for module, init in self.init_parts(seed):
            init(module)

    def init_parts(self, seed: int):
        """(module, its init function) for each independently initialized part: whoever holds a part's
        parameters (a pipeline stage, a ZeRO-3 gather) can initialize it alone."""
        cfg = self.cfg
        yield self.emb, lambda m: init_embedding(m, cfg, seed)
        yield self.head, lambda m: init_head(m, cfg, seed)
        yield self.ln_out, lambda m: m.reset_parameters()
        for block in self.blocks:
            yield block, lambda m: init_block(m, cfg, seed)

    # ---- running ----
    def forward(self, idx: torch.Tensor, state: Optional[RRWKVState] = None, return_state: bool = False):
        """idx: (B, T) token ids -> logits (B, T, vocab) [, state after the chunk]."""
        x, new_state = self.features(idx, state)
        logits = self.head(x)
        if return_state:
            return logits, new_state
        return logits

    def features(self, idx: torch.Tensor, state: Optional[RRWKVState] = None):
        """idx: (B, T) -> (the head's input (B, T, C), state after the chunk): for callers that need the
        logits at a few positions only (the head applied to those rows alone)."""
        x = self.emb(idx)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, st = block(x, None if state is None else state.layers[i])
            new_layers.append(st)
        return self.ln_out(x), RRWKVState(new_layers)

    def step(self, idx_t: torch.Tensor, state: Optional[RRWKVState] = None):
        """One token per sequence: idx_t (B,) -> (logits (B, vocab), new state)."""
        logits, state = self.forward(idx_t[:, None], state, return_state=True)
        return logits[:, 0], state

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.emb.weight.numel() + self.head.weight.numel()
        return n


def _generator(seed: int, index: int) -> torch.Generator:
    # Distinct, layout-independent streams: one per layer (index >= 0), embedding (-1), head (-2).
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (index + 3))


def _orthogonal_(weight: torch.Tensor, gain: float, gen: torch.Generator) -> None:
    """Orthogonal init drawn on CPU from `gen` (the same numbers in any layout), factored by QR on the
    GPU when the process has one (on CPU the QRs of a 7B-14B model take minutes), copied into `weight`
    (any device/dtype)."""
    rows, cols = weight.shape
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=gen)
    if torch.cuda.is_available():
        flat = flat.cuda()
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r))[None]
    if rows < cols:
        q = q.T
    weight.copy_((q[:rows, :cols] * gain).to(weight.dtype))


def _linear_gain(weight: torch.Tensor) -> float:
    rows, cols = weight.shape
    return math.sqrt(rows / cols) if rows > cols else 1.0


@torch.no_grad()
def init_embedding(emb: nn.Embedding, cfg: RRWKVConfig, seed: int) -> None:
    gen = _generator(seed, -1)
    emb.weight.copy_(((torch.rand(emb.weight.shape, generator=gen) * 2 - 1) * 1e-4).to(emb.weight.dtype))


@torch.no_grad()
def init_head(head: nn.Linear, cfg: RRWKVConfig, seed: int) -> None:
    gain = 0.5 * math.sqrt(cfg.vocab_size / cfg.n_embd) if cfg.vocab_size > cfg.n_embd else 0.5
    _orthogonal_(head.weight, gain, _generator(seed, -2))


@torch.no_grad()
def init_block(block: Block, cfg: RRWKVConfig, seed: int) -> None:
    """RWKV-4's curves by layer ratio, zero-init of att.key/receptance/output and
    ffn.value/receptance, orthogonal elsewhere; medium_decay = time_decay; excitation up-proj zero."""
    i, L, C = block.layer_id, cfg.n_layer, cfg.n_embd
    gen = _generator(seed, i)
    r01 = i / (L - 1) if L > 1 else 0.0
    r1to0 = 1.0 - i / L
    ddd = torch.arange(C, dtype=torch.float64) / C
    h = torch.arange(C, dtype=torch.float64)
    decay = -5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
    zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(C)], dtype=torch.float64) * 0.5
    att, ffn = block.att, block.ffn
    set_ = lambda p, val: p.copy_(val.reshape(p.shape).to(p.dtype))  # noqa: E731
    set_(att.time_decay, decay)
    set_(att.time_first, torch.full((C,), math.log(0.3), dtype=torch.float64) + zigzag)
    set_(att.time_mix_k, ddd ** r1to0)
    set_(att.time_mix_v, ddd ** r1to0 + 0.3 * r01)
    set_(att.time_mix_r, ddd ** (0.5 * r1to0))
    set_(ffn.time_mix_k, ddd ** r1to0)
    set_(ffn.time_mix_r, ddd ** r1to0)
    for ln in [m for m in block.modules() if isinstance(m, nn.LayerNorm)]:
        ln.reset_parameters()
    for lin in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
        lin.weight.zero_()
    for lin in (att.value, ffn.key):
        _orthogonal_(lin.weight, _linear_gain(lin.weight), gen)
    if cfg.medium_interval > 0:
        set_(att.medium_decay, decay)
        for ex in (att.excite, ffn.excite):
            _orthogonal_(ex.down.weight, _linear_gain(ex.down.weight), gen)
            ex.up.weight.zero_()
