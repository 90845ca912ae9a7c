"""The three models of the recall suite, their carried state, and logits at the answer positions.

- `rwkv4`: RRWKV with medium_interval 0 (exactly RWKV-4); `rrwkv`: RRWKV with mediums every S tokens.
- `attention`: a causal SDPA transformer of baseline.py's blocks with learned absolute positions,
  parameter-matched to the RRWKV of the same width and depth (13 C^2 a layer: MLP hidden 4.5 C, as
  baseline.SDPATransformer; the position table, max_len x C, is extra). Heads: max(2, C // 64), so
  head_dim = C // heads (32 at C = 64, 64 from C = 128 on): small widths still get two heads, an
  induction-style lookup needs one head to find the earlier key and another to copy its neighbour.
  Its positions stop at max_len (the training length): it cannot run longer sequences at all, so
  the gap evaluation reports it only at lengths up to max_len (null beyond).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from rrwkv.pretrain.baseline import TransformerBlock
from rrwkv.pretrain.model import RRWKV, RRWKVConfig

MODELS = ("attention", "rwkv4", "rrwkv")


class AttentionLM(nn.Module):
    """Causal transformer with learned absolute positions (the recall suite's attention control)."""

    def __init__(self, vocab_size: int, n_layer: int, n_embd: int, max_len: int, seed: int = 0, heads: int = 0):
        super().__init__()
        self.max_len = max_len
        self.n_head = heads or max(2, n_embd // 64)
        if n_embd % self.n_head:
            raise ValueError(f"attention: --d-model ({n_embd}) must be divisible by its {self.n_head} heads")
        hidden = (13 * n_embd ** 2 - 4 * n_embd ** 2) // (2 * n_embd)   # = RRWKV's 13 C^2 per layer
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(max_len, n_embd)
        self.blocks = nn.ModuleList([TransformerBlock(n_embd, self.n_head, hidden) for _ in range(n_layer)])
        self.ln_out = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self._init(seed, n_layer)

    @torch.no_grad()
    def _init(self, seed: int, n_layer: int) -> None:
        """GPT-2's: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer); drawn from a CPU
        generator of `seed`, so the same seed gives the same weights on any device."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue   # LayerNorms keep (1, 0)
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "down.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.pos.weight.copy_(sinusoids(*self.pos.weight.shape) * 0.02)


    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(idx)[0])

    def features(self, idx: torch.Tensor, state=None):
        """(the head's input (B, T, C), None): the same call as RRWKV.features (no state to carry)."""
        T = idx.shape[1]
        if T > self.max_len:
            raise ValueError(f"attention: sequence of {T} tokens exceeds its {self.max_len} learned positions")
        x = self.emb(idx) + self.pos.weight[:T]
        for b in self.blocks:
            x = b(x)
        return self.ln_out(x), None


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoids (length, dim), scaled to unit RMS per entry: the position table's starting
    point, from which a relative offset (the previous token, say) is one linear map away."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return (table * math.sqrt(2.0)).float()


def build_model(model: str, vocab_size: int, d_model: int, layers: int, seq_len: int, interval: int = 0,
                seed: int = 0, tie_embeddings: bool = False, heads: int = 0) -> nn.Module:
    """One of MODELS at the given width, depth and training length, initialized from `seed`.
    `tie_embeddings`: the output head shares the input embedding's matrix (Zoology's models do: a
    value is then predicted by copying its own embedding forward). `heads`: the attention control's
    heads (0: max(2, d_model // 64))."""
    net = _build(model, vocab_size, d_model, layers, seq_len, interval, seed, heads)
    if tie_embeddings:
        net.head.weight = net.emb.weight
    return net


def _build(model, vocab_size, d_model, layers, seq_len, interval, seed, heads) -> nn.Module:
    if model == "attention":
        return AttentionLM(vocab_size, layers, d_model, seq_len, seed, heads)
    if model == "rwkv4":
        interval = 0
    elif model == "rrwkv":
        if interval <= 0:
            raise ValueError("rrwkv needs --interval S > 0 (interval 0 is --model rwkv4)")
    else:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    se = 16 if d_model >= 16 else d_model
    return RRWKV(RRWKVConfig(vocab_size=vocab_size, n_layer=layers, n_embd=d_model, ctx_len=seq_len,
                             medium_interval=interval, se_reduction=se), init_seed=seed)


def is_recurrent(model: nn.Module) -> bool:
    return isinstance(model, RRWKV)


def state_size(model: nn.Module, length: int) -> int:
    """Floats carried per layer to continue a sequence. Recurrent models: counted from a real state
    (RWKV-4: aa, bb, pp and the two token-shift inputs = 5C; RRWKV adds the medium sums ma, mb, mp,
    the running segment sums of both mixes and the channel-mix gate = 11C; the segment phase, an
    integer, is not counted). Attention: its KV cache at `length` tokens, 2 C x length."""
    if not is_recurrent(model):
        return 2 * model.emb.weight.shape[1] * length
    p = next(model.parameters())
    with torch.no_grad():
        _, st = model(torch.zeros(1, 1, dtype=torch.long, device=p.device), return_state=True)
    layer = st.layers[0]
    tensors = [layer.att_x, layer.ffn_x, layer.att_sum, layer.ffn_sum, layer.gate, *layer.wkv.tensors()]
    return sum(t.numel() for t in tensors if t is not None)


def answer_logits(model: nn.Module, inputs: torch.Tensor, positions: torch.Tensor,
                  chunk: Optional[int] = None) -> torch.Tensor:
    """Logits (B, K, V) at the answer positions: the head runs on those K rows only (at vocabulary
    8192 the full (B, T, V) logits would cost more than the two layers). A recurrent model given
    `chunk` runs the sequence in chunks of that length with its state carried (constant memory at
    any length); otherwise one pass."""
    T, C = inputs.shape[1], model.head.weight.shape[1]
    if chunk is None or chunk >= T or not is_recurrent(model):
        x, _ = model.features(inputs)
        return model.head(x.gather(1, positions[..., None].expand(-1, -1, C)))
    picked, state = None, None
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        x, state = model.features(inputs[:, a:b], state)
        inside = (positions >= a) & (positions < b)
        rows = x.gather(1, (positions - a).clamp(0, b - a - 1)[..., None].expand(-1, -1, C))
        picked = rows if picked is None else torch.where(inside[..., None], rows, picked)
    return model.head(picked)
