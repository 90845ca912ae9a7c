"""Learning-rate schedule: linear warmup, then decay to lr_final (as a factor of the base lr)."""
from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, lr: float, lr_final: float,
              schedule: str = "cosine") -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based)."""
    final = lr_final / lr
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 + (final - 1.0) * progress
    if schedule == "exponential":
        return math.exp(math.log(max(final, 1e-12)) * progress)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{schedule}'")
