"""Sampling from an RRWKV in recurrent mode: prefill the prompt in chunks, then one `model.step` per token.

Memory is constant per generated token: only the recurrent state (RRWKVState, a few (B, C) tensors
per layer) is carried, never the tokens before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from .errors import UserError

@dataclass
class Sampling:
    temperature: float = 1.0     # 0: greedy
    top_k: int = 0               # 0: no top-k cut
    top_p: float = 1.0           # 1: no nucleus cut

    def check(self) -> "Sampling":
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self


def sample_next(logits: torch.Tensor, s: Sampling, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): temperature, then top-k, then top-p (nucleus)."""
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk_len: int, state=None):
    """Run (B, T) token ids through the chunked mode; returns (logits of the last position (B, V), state)."""
    logits = None
    for start in range(0, ids.shape[1], chunk_len):
        logits, state = model(ids[:, start:start + chunk_len], state, return_state=True)
    return logits[:, -1], state


@torch.no_grad()
def generate(model, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: Optional[int] = None, chunk_len: Optional[int] = None, stop_ids: Sequence[int] = (),
             on_logits: Optional[Callable[[torch.Tensor], None]] = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids continuing `prompt` (a non-empty list of ids).

    Sampling draws from a torch.Generator seeded with `seed` (on the model's device), so a seed gives
    the same tokens every time on the same device. Stops after yielding a token of `stop_ids`.
    `on_logits` sees the (V,) logits each token was drawn from (tests compare them to the parallel mode).
    """
    sampling.check()
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the EOS id, as a document start)")
    device = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    logits, state = prefill(model, ids, chunk_len or model.cfg.ctx_len)
    for _ in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits[0])
        token = sample_next(logits, sampling, gen)
        t = int(token[0])
        yield t
        if t in stop_ids:
            return
        logits, state = model.step(token, state)


class TextStream:
    """Token ids -> text pieces to print as they come, holding back ids that end inside a character.

    Decoding each id alone would split multi-byte UTF-8 characters (byte-fallback pieces), so ids
    are buffered until their decoded text no longer ends in U+FFFD.
    """

    def __init__(self, decode: Callable[[List[int]], str], max_pending: int = 8):
        self.decode, self.pending, self.max_pending = decode, [], max_pending

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.max_pending:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def pick_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def default_dtype(device: torch.device) -> Tuple[torch.dtype, str]:
    """bf16 on GPUs that have it (what the model was trained in), fp32 on CPUs."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16"
    return torch.float32, "fp32"
