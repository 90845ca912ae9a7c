"""The carried state of the WKV-retrospection op (shared by the reference and the CUDA kernel)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Stand-in for log(0) in the running-maximum representation: finite so that no -inf - -inf NaN
# can appear, small enough that exp(NEG - anything reasonable) is exactly 0 (RWKV-4 uses -1e38).
NEG = -1e38


@dataclass
class WKVState:
    """State after a chunk: the token sum and the medium sum, each as (a, b, p).

    A sum S = sum_i exp(x_i) v_i is kept as a = S * exp(-p), b = (sum_i exp(x_i)) * exp(-p), with
    p a running maximum, so that num = a * exp(p) and den = b * exp(p). All tensors are (B, C),
    float32 (or float64 for float64 inputs).
    - aa, bb, pp: sum over tokens i < t of exp(-(t-1-i) * exp(time_decay) + k_i) (v_i or 1),
      i.e. what the next token's WKV sees before its own bonus term.
    - ma, mb, mp: sum over complete segments m < j of exp(-(j-1-m) * exp(medium_decay) + mk_m)
      (mv_m or 1), j the segment in progress. None when interval == 0.
    - phase: position within the segment in progress at which the next chunk starts (0 when
      interval == 0).
    """

    aa: torch.Tensor
    bb: torch.Tensor
    pp: torch.Tensor
    ma: Optional[torch.Tensor] = None
    mb: Optional[torch.Tensor] = None
    mp: Optional[torch.Tensor] = None
    phase: int = 0

    @staticmethod
    def fresh(batch: int, channels: int, interval: int, dtype: torch.dtype, device) -> "WKVState":
        """The state of a sequence that has not started."""
        zeros = lambda: torch.zeros(batch, channels, dtype=dtype, device=device)  # noqa: E731
        neg = lambda: torch.full((batch, channels), NEG, dtype=dtype, device=device)  # noqa: E731
        if interval > 0:
            return WKVState(zeros(), zeros(), neg(), zeros(), zeros(), neg(), 0)
        return WKVState(zeros(), zeros(), neg(), None, None, None, 0)

    def tensors(self):
        return [t for t in (self.aa, self.bb, self.pp, self.ma, self.mb, self.mp) if t is not None]

    def detach(self) -> "WKVState":
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return WKVState(d(self.aa), d(self.bb), d(self.pp), d(self.ma), d(self.mb), d(self.mp), self.phase)

    def select(self, index) -> "WKVState":
        """The state of a subset of the batch (index into dim 0)."""
        s = lambda t: None if t is None else t[index]  # noqa: E731
        return WKVState(s(self.aa), s(self.bb), s(self.pp), s(self.ma), s(self.mb), s(self.mp), self.phase)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype if wider."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_mediums(phase: int, T: int, interval: int) -> int:
    """J of interfaces.md: segments that end inside a chunk or are still in progress at its end."""
    return 0 if interval <= 0 else -(-(phase + T) // interval)
