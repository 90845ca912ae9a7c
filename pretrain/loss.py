"""The training loss: next-token cross-entropy in float32, with RWKV-4's L2Wrap logit regularizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class L2Wrap(torch.autograd.Function):
    """RWKV-4's logit regularizer: identity on the loss; in backward, a push of 1e-4 / (B*T) times the
    largest logit of each position back down (it keeps logits from drifting up in bf16)."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        top, ids = torch.max(logits, -1, keepdim=True)
        g = torch.zeros_like(logits)
        g.scatter_(-1, ids, top * factor)
        return grad_output, g * grad_output.to(g.dtype)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, l2wrap: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (with RWKV-4's L2Wrap in backward if asked)."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return L2Wrap.apply(loss, logits) if l2wrap else loss
