"""Learning-rate schedule: linear warmup, then decay to lr_final (as a factor of the base lr).

`wsd` (warmup-stable-decay; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations") holds the base lr after the warmup and decays only over the last
`decay_fraction` of the run's steps, linearly or as 1 - sqrt(progress) ("1-sqrt", the paper's
better cooldown).
"""
from __future__ import annotations

import functools
import math

import torch

SCHEDULES = ("cosine", "linear", "exponential", "constant", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, lr: float, lr_final: float,
              schedule: str = "cosine", decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based); lr_final / lr at step max_steps."""
    final = lr_final / lr
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    start = warmup_steps
    if schedule == "wsd":   # the decay takes the last decay_fraction of all steps (never the warmup's)
        start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
        if step < start:
            return 1.0
    span = max(1, max_steps - start)
    progress = min(1.0, max(0.0, (step - start) / span))
    if schedule == "constant":
        return 1.0
    if schedule == "linear" or (schedule == "wsd" and decay_shape == "linear"):
        return 1.0 + (final - 1.0) * progress
    if schedule == "wsd" and decay_shape == "1-sqrt":
        return final + (1.0 - final) * (1.0 - math.sqrt(progress))
    if schedule == "exponential":
        return math.exp(math.log(max(final, 1e-12)) * progress)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{schedule}' (decay shape '{decay_shape}')")


def lr_scheduler(optimizer: torch.optim.Optimizer, optim, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's scheduler over `optimizer` (each group's lr is its base lr times lr_factor) from the
    config's `optim` section. Its state is the step count alone (DeepSpeed saves it with the
    checkpoint), so a resumed run continues the same lr sequence."""
    factor = functools.partial(lr_factor, warmup_steps=optim.warmup_steps, max_steps=max_steps, lr=optim.lr,
                               lr_final=optim.lr_final, schedule=optim.schedule,
                               decay_fraction=optim.decay_fraction, decay_shape=optim.decay_shape)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
