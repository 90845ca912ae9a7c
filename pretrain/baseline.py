"""An equal-parameter transformer (PyTorch SDPA, i.e. FlashAttention on GPUs) to time RRWKV against.

Same width, depth, vocabulary, sequence length and batch as the RRWKV it is compared with; the
MLP's hidden width is chosen so that a layer has RRWKV's parameter count (13 C^2 with ffn 4C:
attention 4 C^2 + MLP 2 C H, so H = 4.5 C). Compile and activation checkpointing apply to its
blocks as to RRWKV's (pretrain/parallelize.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TransformerBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, mlp_hidden: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.up = nn.Linear(n_embd, mlp_hidden, bias=False)
        self.down = nn.Linear(mlp_hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class SDPATransformer(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int, n_embd: int, head_dim: int = 128, ffn_mult: int = 4):
        super().__init__()
        rrwkv_layer = (4 + 2 * ffn_mult + 1) * n_embd ** 2
        hidden = (rrwkv_layer - 4 * n_embd ** 2) // (2 * n_embd)
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList([TransformerBlock(n_embd, max(1, n_embd // head_dim), hidden)
                                     for _ in range(n_layer)])
        self.ln_out = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_out(x))

    def flops_per_token(self, seq_len: int) -> float:
        """6 N_nonembedding + 6 C V, plus causal attention's 6 * n_layer * T * C (half of 12 T C)."""
        n = sum(p.numel() for p in self.blocks.parameters())
        C = self.emb.weight.shape[1]
        return 6.0 * n + 6.0 * C * self.head.weight.shape[0] + 6.0 * len(self.blocks) * seq_len * C
