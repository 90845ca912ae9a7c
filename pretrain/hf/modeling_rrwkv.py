"""RRWKV for Hugging Face transformers (remote code): RWKV-4 with retrospection (mediums) and an excitation gate.

Shipped by rrwkv-pretrain (`launch/convert.py --to hf-rrwkv`) beside the weights, and loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. The math is rrwkv-pretrain's
docs/model.md, as its pretrain/model.py (the layers) and kernels/reference.py (the WKV recurrence in
log-space) compute it; that project's tests check this copy against them, logit for logit.

Self-contained: pure PyTorch, no import of the `rrwkv` package. Where `rrwkv` is installed and the
tensors are on a CUDA device, the WKV op runs its CUDA kernel instead (config `use_cuda_kernel`).
The recurrent state (RRWKVState, a few (B, C) tensors per layer) is the cache: `model(ids,
state=state)` continues a sequence, and `generate()` carries it as RWKV's `state`; memory is constant
per token. The model has no attention mask: sequences of a batch must be of equal length (no padding).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_rrwkv import RRWKVConfig

logger = logging.get_logger(__name__)

# Stand-in for log(0) in the running-maximum representation: finite, so no -inf - -inf NaN can appear.
NEG = -1e38
CHUNK = 16   # positions per time chunk of the pure-PyTorch WKV


# ---- the recurrent state ----

@dataclass
class WKVState:
    """The WKV sums after a chunk, each kept as (a, b, p): num = a * exp(p), den = b * exp(p), p a running
    maximum. aa/bb/pp: the token sum; ma/mb/mp: the sum over complete segments (None at interval 0); phase:
    the position within the segment in progress. Tensors (B, C), float32 (or float64 for float64 inputs)."""

    aa: torch.Tensor
    bb: torch.Tensor
    pp: torch.Tensor
    ma: Optional[torch.Tensor] = None
    mb: Optional[torch.Tensor] = None
    mp: Optional[torch.Tensor] = None
    phase: int = 0

    @staticmethod
    def fresh(batch: int, channels: int, interval: int, dtype: torch.dtype, device) -> "WKVState":
        zeros = lambda: torch.zeros(batch, channels, dtype=dtype, device=device)  # noqa: E731
        neg = lambda: torch.full((batch, channels), NEG, dtype=dtype, device=device)  # noqa: E731
        if interval > 0:
            return WKVState(zeros(), zeros(), neg(), zeros(), zeros(), neg(), 0)
        return WKVState(zeros(), zeros(), neg(), None, None, None, 0)


@dataclass
class LayerState:
    """One layer's state: the two shifted inputs, the WKV sums, the running sums of the segment in progress
    and the channel-mix gate of that segment (the last three None at interval 0)."""

    att_x: torch.Tensor
    ffn_x: torch.Tensor
    wkv: WKVState
    att_sum: Optional[torch.Tensor] = None
    ffn_sum: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None

    @property
    def phase(self) -> int:
        return self.wkv.phase


class RRWKVState:
    """Every layer's state after the tokens read so far: the model's cache (`state` in forward and generate)."""

    def __init__(self, layers: List[LayerState]):
        self.layers = layers

    def _map(self, fn) -> None:
        for layer in self.layers:
            for owner, names in ((layer, ("att_x", "ffn_x", "att_sum", "ffn_sum", "gate")),
                                 (layer.wkv, ("aa", "bb", "pp", "ma", "mb", "mp"))):
                for name in names:
                    t = getattr(owner, name)
                    if t is not None:
                        setattr(owner, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the batch rows `beam_idx` (beam search), in place."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def detach(self) -> "RRWKVState":
        """Cut the gradient through the state (truncated backpropagation between chunks), in place."""
        self._map(lambda t: t.detach())
        return self

    def __len__(self) -> int:
        return len(self.layers)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_mediums(phase: int, T: int, interval: int) -> int:
    """Segments that end inside a chunk of T positions starting at `phase`, or are in progress at its end."""
    return 0 if interval <= 0 else -(-(phase + T) // interval)


# ---- the WKV op with retrospection ----

def decayed_scan(w, k, v, init, chunk: int = CHUNK):
    """Exclusive decayed sums S_n = exp(-n w) S_0 + sum_{i<n} exp(-(n-1-i) w + k_i) v_i, in log-space.

    w: (C,) decay rate per step; k, v: (B, N, C); init: (a, b, p) each (B, C). Returns ((a, b, p) each
    (B, N, C): the sum before each position; (a, b, p) each (B, C): after N). Pairwise terms within a
    chunk at once, the state carried across chunks.
    """
    B, N, C = k.shape
    a0, b0, p0 = init
    outs = []
    for s0 in range(0, N, chunk):
        kc, vc = k[:, s0:s0 + chunk], v[:, s0:s0 + chunk]
        L = kc.shape[1]
        n = torch.arange(L, device=k.device, dtype=k.dtype)
        dist = (n[:, None] - 1 - n[None, :])
        lw = kc[:, None, :, :] - dist[None, :, :, None] * w                 # weight of token i seen at n
        causal = (n[None, :] < n[:, None])[None, :, :, None]
        lw = lw.masked_fill(~causal, NEG)
        lp = p0[:, None, :] - n[None, :, None] * w                          # the carried sum seen at n
        m = torch.maximum(lw.amax(2), lp).detach()
        e = torch.exp(lw - m[:, :, None])
        ep = torch.exp(lp - m)
        a = torch.einsum("bnic,bic->bnc", e, vc) + a0[:, None] * ep
        b = e.sum(2) + b0[:, None] * ep
        outs.append((a, b, m))
        lwf = kc - (L - 1 - n)[None, :, None] * w                            # the sum after the chunk
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


def wkv_pytorch(time_decay, time_first, k, v, medium_decay=None, mk=None, mv=None, interval: int = 0,
                state: Optional[WKVState] = None) -> Tuple[torch.Tensor, WKVState]:
    """WKV with retrospection over one chunk: y (B, T, C) in k's dtype and the state after it.

    k, v: (B, T, C); mk, mv: (B, J, C), J = num_mediums(phase, T, interval), mk[:, 0] the medium of the
    segment in progress at the chunk's start. Per channel: num_t = sum_{i<t} exp(-(t-1-i) ew + k_i) v_i
    + exp(u + k_t) v_t + sum_{m<j(t)} exp(-(j(t)-1-m) ewm + mk_m) mv_m, den_t the same with v, mv = 1.
    """
    B, T, C = k.shape
    cdt = state_dtype(k.dtype)
    if state is None:
        state = WKVState.fresh(B, C, interval, cdt, k.device)
    phase = state.phase
    ew = torch.exp(time_decay.to(cdt))
    u = time_first.to(cdt)
    kf, vf = k.to(cdt), v.to(cdt)
    (a, b, p), (fa, fb, fp) = decayed_scan(ew, kf, vf, (state.aa.to(cdt), state.bb.to(cdt), state.pp.to(cdt)))
    lu = u + kf
    m = torch.maximum(p, lu)
    if interval > 0:
        ewm = torch.exp(medium_decay.to(cdt))
        J = mk.shape[1]
        (ma, mb, mp), (fma, fmb, fmp) = decayed_scan(
            ewm, mk.to(cdt), mv.to(cdt), (state.ma.to(cdt), state.mb.to(cdt), state.mp.to(cdt)))
        seg = torch.div(torch.arange(T, device=k.device) + phase, interval, rounding_mode="floor")
        ma_t, mb_t, mp_t = ma[:, seg], mb[:, seg], mp[:, seg]
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
        if (phase + T) // interval < J:    # the last segment is still in progress: its medium is not folded in
            fma, fmb, fmp = ma[:, J - 1], mb[:, J - 1], mp[:, J - 1]
        new = WKVState(fa, fb, fp, fma, fmb, fmp, (phase + T) % interval)
    else:
        new = WKVState(fa, fb, fp, None, None, None, 0)
    return (num / den).to(k.dtype), new


_KERNEL = None   # rrwkv's (wkv_retro, WKVState) once looked up; False when rrwkv is not installed


def _rrwkv_kernel():
    global _KERNEL
    if _KERNEL is None:
        try:
            from rrwkv.kernels.state import WKVState as KernelState
            from rrwkv.kernels.wkv import wkv_retro
            _KERNEL = (wkv_retro, KernelState)
        except ImportError:
            logger.warning_once("RRWKV: the rrwkv package is not installed, so the WKV op runs in plain PyTorch on "
                                "the GPU (slow); `pip install rrwkv-pretrain` brings its CUDA kernel")
            _KERNEL = False
    return _KERNEL


def wkv(time_decay, time_first, k, v, medium_decay, mk, mv, interval: int, state: Optional[WKVState],
        use_cuda_kernel: bool) -> Tuple[torch.Tensor, WKVState]:
    """The WKV op: rrwkv's CUDA kernel for CUDA tensors when it is installed, else the PyTorch version above."""
    if use_cuda_kernel and k.is_cuda and _rrwkv_kernel():
        wkv_retro, KernelState = _KERNEL
        s = None if state is None else KernelState(state.aa, state.bb, state.pp, state.ma, state.mb, state.mp,
                                                   state.phase)
        y, s = wkv_retro(time_decay, time_first, k, v, medium_decay, mk, mv, interval, s)
        return y, WKVState(s.aa, s.bb, s.pp, s.ma, s.mb, s.mp, s.phase)
    return wkv_pytorch(time_decay, time_first, k, v, medium_decay, mk, mv, interval, state)


# ---- the layers ----

def token_shift(x: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
    """x_{t-1} for each t: (B, T, C); `last` (B, C) is the carried previous input (zeros if None)."""
    if last is None:
        return F.pad(x, (0, 0, 1, -1))
    return torch.cat([last[:, None].to(x.dtype), x[:, :-1]], dim=1)


def mix(xx: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x * m + xx * (1 - m) as xx + d * m, d = x - xx."""
    return torch.addcmul(xx, d, m)


def segment_means(x: torch.Tensor, carried_sum: Optional[torch.Tensor], phase: int, interval: int):
    """Means of x (B, T, C) over the segments the chunk touches (B, J, C), and the running sum (B, C) of the
    segment in progress at its end. The chunk starts `phase` positions into a segment whose earlier inputs sum
    to `carried_sum`; a segment still in progress is averaged over the positions seen so far."""
    B, T, C = x.shape
    J = num_mediums(phase, T, interval)
    if phase == 0 and T % interval == 0:
        return x.view(B, J, interval, C).mean(2), x.new_zeros(B, C)
    padded = x.new_zeros(B, J * interval, C)
    padded[:, phase:phase + T] = x
    sums = padded.view(B, J, interval, C).sum(2)
    if carried_sum is not None and phase > 0:
        sums = torch.cat([sums[:, :1] + carried_sum[:, None].to(x.dtype), sums[:, 1:]], 1)
    filled = torch.full((J,), float(interval), dtype=x.dtype, device=x.device)
    filled[-1] = (phase + T) - (J - 1) * interval
    means = sums / filled[None, :, None]
    running = sums[:, -1] if (phase + T) % interval != 0 else torch.zeros_like(sums[:, -1])
    return means, running


def per_segment(x: torch.Tensor, g: torch.Tensor, phase: int, interval: int) -> torch.Tensor:
    """x (B, T, C) times the gate of each position's segment, g[:, (phase + t) // interval]; g: (B, >=J, C)."""
    B, T, C = x.shape
    if phase == 0 and T % interval == 0:
        J = T // interval
        return (x.view(B, J, interval, C) * g[:, :J, None]).view(B, T, C)
    J = num_mediums(phase, T, interval)
    padded = F.pad(x, (0, 0, phase, J * interval - phase - T))
    return (padded.view(B, J, interval, C) * g[:, :J, None]).view(B, J * interval, C)[:, phase:phase + T]


class RRWKVExcitation(nn.Module):
    """sigmoid(W2 relu(W1 m)) of squeeze-and-excitation, on segment means (B, J, C)."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(F.relu(self.down(m))))


class RRWKVTimeMix(nn.Module):
    def __init__(self, config: RRWKVConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        self.interval = config.medium_interval
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
            self.excite = RRWKVExcitation(C, config.se_hidden)

    def forward(self, x: torch.Tensor, st: Optional[LayerState], use_cuda_kernel: bool):
        """x: (B, T, C) after ln1 -> (out (B, T, C), WKV state, running sum of the segment in progress)."""
        xx = token_shift(x, None if st is None else st.att_x)
        d = x - xx
        xk, xv, xr = mix(xx, d, self.time_mix_k), mix(xx, d, self.time_mix_v), mix(xx, d, self.time_mix_r)
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        wkv_state = None if st is None else st.wkv
        att_sum = None
        if self.interval > 0:
            phase = 0 if st is None else st.phase
            m, att_sum = segment_means(x, None if st is None else st.att_sum, phase, self.interval)
            me = m * self.excite(m)                                      # squeeze, then excite
            y, wkv_state = wkv(self.time_decay, self.time_first, k, v, self.medium_decay, self.key(me),
                               self.value(me), self.interval, wkv_state, use_cuda_kernel)
        else:
            y, wkv_state = wkv(self.time_decay, self.time_first, k, v, None, None, None, 0, wkv_state,
                               use_cuda_kernel)
        return self.output(torch.sigmoid(r) * y), wkv_state, att_sum


class RRWKVChannelMix(nn.Module):
    def __init__(self, config: RRWKVConfig, layer_id: int):
        super().__init__()
        C, H = config.n_embd, config.ffn_mult * config.n_embd
        self.layer_id = layer_id
        self.interval = config.medium_interval
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, H, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(H, C, bias=False)
        if self.interval > 0:
            self.excite = RRWKVExcitation(C, config.se_hidden)

    def gates(self, y: torch.Tensor, st: Optional[LayerState]):
        """Gates of the segments the chunk touches (B, J+1, C) (g[:, 0]: the segment in progress at its start),
        the running sum, and the gate of the segment in progress at its end."""
        s = self.interval
        B, T, C = y.shape
        phase = 0 if st is None else st.phase
        c, running = segment_means(y, None if st is None else st.ffn_sum, phase, s)
        g_first = y.new_ones(B, 1, C) if st is None or st.gate is None else st.gate[:, None].to(y.dtype)
        g = torch.cat([g_first, 2 * self.excite(c)], 1)                    # g[j+1] from c[j]
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
        return out, ffn_sum, gate


class RRWKVBlock(nn.Module):
    def __init__(self, config: RRWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        eps = config.layer_norm_epsilon
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(config.n_embd, eps=eps)
        self.ln1 = nn.LayerNorm(config.n_embd, eps=eps)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=eps)
        self.att = RRWKVTimeMix(config, layer_id)
        self.ffn = RRWKVChannelMix(config, layer_id)

    def forward(self, x: torch.Tensor, st: Optional[LayerState], use_cuda_kernel: bool):
        """x: (B, T, C) -> (B, T, C) and this layer's state after the chunk."""
        if self.layer_id == 0:
            x = self.ln0(x)
        h = self.ln1(x)
        a, wkv_state, att_sum = self.att(h, st, use_cuda_kernel)
        x = x + a
        y = self.ln2(x)
        f, ffn_sum, gate = self.ffn(y, st)
        return x + f, LayerState(h[:, -1], y[:, -1], wkv_state, att_sum, ffn_sum, gate)


# ---- the transformers classes ----

@dataclass
class RRWKVOutput(ModelOutput):
    """last_hidden_state (B, T, C) after ln_out; state: the RRWKVState after the chunk (with use_cache)."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    state: Optional[RRWKVState] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclass
class RRWKVCausalLMOutput(ModelOutput):
    """loss (with labels); logits (B, T, vocab); state: the RRWKVState after the chunk (with use_cache)."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    state: Optional[RRWKVState] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


class RRWKVPreTrainedModel(PreTrainedModel):
    config_class = RRWKVConfig
    base_model_prefix = "rrwkv"
    main_input_name = "input_ids"
    _no_split_modules = ["RRWKVBlock"]
    _is_stateful = True
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """RWKV-4's initialization (docs/model.md), for models made from a config rather than loaded."""
        cfg = self.config
        C, L = cfg.n_embd, cfg.n_layer

        def set_(p, value):
            if not getattr(p, "_is_hf_initialized", False):   # leave loaded weights alone
                p.copy_(value.reshape(p.shape).to(p.dtype))

        if isinstance(module, (RRWKVTimeMix, RRWKVChannelMix)):
            i = module.layer_id
            r01, r1to0 = (i / (L - 1) if L > 1 else 0.0), 1.0 - i / L
            ddd = torch.arange(C, dtype=torch.float64) / C
            if isinstance(module, RRWKVTimeMix):
                h = torch.arange(C, dtype=torch.float64)
                decay = -5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
                zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(C)], dtype=torch.float64) * 0.5
                set_(module.time_decay, decay)
                set_(module.time_first, torch.full((C,), math.log(0.3), dtype=torch.float64) + zigzag)
                set_(module.time_mix_v, ddd ** r1to0 + 0.3 * r01)
                set_(module.time_mix_r, ddd ** (0.5 * r1to0))
                if module.interval > 0:
                    set_(module.medium_decay, decay)
                zeroed = (module.key, module.receptance, module.output)
            else:
                set_(module.time_mix_r, ddd ** r1to0)
                zeroed = (module.value, module.receptance)
            set_(module.time_mix_k, ddd ** r1to0)
            for lin in zeroed:
                nn.init.zeros_(lin.weight)
            if module.interval > 0:
                nn.init.zeros_(module.excite.up.weight)
        elif isinstance(module, nn.Linear):
            rows, cols = module.weight.shape
            gain = math.sqrt(rows / cols) if rows > cols else 1.0
            if rows == cfg.vocab_size and cols == C:         # the head
                gain = 0.5 * math.sqrt(cfg.vocab_size / C) if cfg.vocab_size > C else 0.5
            nn.init.orthogonal_(module.weight, gain=gain)
        elif isinstance(module, nn.Embedding):
            nn.init.uniform_(module.weight, -1e-4, 1e-4)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _check_no_padding(attention_mask: Optional[torch.Tensor]) -> None:
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("RRWKV has no attention mask: padding would be read as tokens. Pass sequences of equal "
                         "length (or one at a time) and no padded positions")


class RRWKVModel(RRWKVPreTrainedModel):
    def __init__(self, config: RRWKVConfig):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([RRWKVBlock(config, i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, new_embeddings):
        self.emb = new_embeddings

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, state: Optional[RRWKVState] = None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs):
        """input_ids (B, T) (or inputs_embeds (B, T, C)), continuing `state` when given -> RRWKVOutput."""
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None \
            else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_no_padding(attention_mask)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.blocks)}")
        all_hidden = (x,) if output_hidden_states else None
        layers = []
        use_kernel = bool(getattr(self.config, "use_cuda_kernel", True))
        for i, block in enumerate(self.blocks):
            x, st = block(x, None if state is None else state.layers[i], use_kernel)
            layers.append(st)
            if output_hidden_states:
                all_hidden = all_hidden + (x,)
        x = self.ln_out(x)
        new_state = RRWKVState(layers) if use_cache else None
        if not return_dict:
            return tuple(v for v in (x, new_state, all_hidden) if v is not None)
        return RRWKVOutput(last_hidden_state=x, state=new_state, hidden_states=all_hidden)


class RRWKVForCausalLM(RRWKVPreTrainedModel, GenerationMixin):
    def __init__(self, config: RRWKVConfig):
        super().__init__(config)
        self.rrwkv = RRWKVModel(config)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.rrwkv.emb

    def set_input_embeddings(self, new_embeddings):
        self.rrwkv.emb = new_embeddings

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, new_embeddings):
        self.head = new_embeddings

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, state: Optional[RRWKVState] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep: int = 0, **kwargs):
        """input_ids (B, T), continuing `state` when given -> RRWKVCausalLMOutput: logits (B, T, vocab) (the last
        `logits_to_keep` positions when > 0), the state after the chunk, and with `labels` (B, T) the mean
        next-token loss (labels are shifted inside; -100 is ignored)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.rrwkv(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, state=state,
                         use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if not return_dict:
            rest = tuple(v for v in (logits, out.state, out.hidden_states) if v is not None)
            return ((loss,) + rest) if loss is not None else rest
        return RRWKVCausalLMOutput(loss=loss, logits=logits, state=out.state, hidden_states=out.hidden_states)

    # generate(): the recurrent state is the cache, under RWKV's name `state`; after the prompt only the newest
    # token is fed. No DynamicCache: there are no keys and values to keep.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, state=None, inputs_embeds=None, use_cache=None,
                                      attention_mask=None, next_sequence_length=None, is_first_iteration=False,
                                      **kwargs):
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        elif state is not None and not is_first_iteration:
            input_ids = input_ids[:, -1:]
        inputs = {"state": state, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and state is None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids.contiguous()
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        if "state" in outputs:
            model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)


__all__ = ["RRWKVForCausalLM", "RRWKVModel", "RRWKVPreTrainedModel", "RRWKVState"]
