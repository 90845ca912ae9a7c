"""One training step and one evaluation over the DeepSpeed engine (parallelize.py builds it)."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .loss import lm_loss


def current_lr(engine) -> float:
    """The base-group learning rate the next optimizer step uses."""
    for g in engine.optimizer.param_groups:
        if g.get("lr_mult", 1.0) == 1.0:
            return float(g["lr"])
    return float(engine.optimizer.param_groups[0]["lr"])


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return isinstance(engine, PipelineEngine)


def injected_fault(step: int, window: int = 0) -> float:
    """Tests: the factor on the loss of a step. RRWKV_FAULT_NONFINITE_STEPS=3,5 makes the loss of those
    (1-based) steps infinite; RRWKV_FAULT_SPIKE_WINDOWS=8,9 multiplies by 1000 the loss of the steps that
    read those (1-based) data windows, as a corrupt batch would."""
    if str(step) in os.environ.get("RRWKV_FAULT_NONFINITE_STEPS", "").split(","):
        return float("inf")
    if window and str(window) in os.environ.get("RRWKV_FAULT_SPIKE_WINDOWS", "").split(","):
        return 1000.0
    return 1.0


def train_step(engine, batches, device: torch.device, step: int = 0, l2wrap: bool = False,
               on_phase: Optional[Callable[[str], None]] = None, window: int = 0) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the loss averaged over all ranks.

    `on_phase(name)`, if given, is called as each micro-batch's "data" (on the device), "forward",
    "backward" and "optimizer" phases end: launch/benchmark.py times the phases through it."""
    if is_pipeline(engine):  # the pipeline engine schedules the micro-batches itself
        return float(engine.train_batch(data_iter=iter(batches)))
    mark = on_phase or (lambda name: None)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        mark("data")
        loss = lm_loss(engine(input_ids), labels, l2wrap)
        mark("forward")
        fault = injected_fault(step, window)
        if fault != 1.0:
            loss = loss * fault
        engine.backward(loss)
        mark("backward")
        engine.step()
        mark("optimizer")
        total += loss.detach().double()
        n += 1
    return all_reduce_mean(total / n)


def all_reduce_sum(n: int, device: torch.device) -> int:
    import torch.distributed as dist
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def all_reduce_mean(x: torch.Tensor) -> float:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


@torch.no_grad()
def evaluate(engine, batches, device: torch.device) -> float:
    """Mean loss over the given batches (all ranks)."""
    if is_pipeline(engine):
        batches = list(batches)
        losses = [float(engine.eval_batch(data_iter=iter([b]), num_micro_batches=1)) for b in batches]
        return all_reduce_mean(torch.tensor(sum(losses) / max(len(losses), 1), dtype=torch.float64, device=device))
    was_training = engine.module.training
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for input_ids, labels in batches:
        total += lm_loss(engine(input_ids.to(device)), labels.to(device)).double()
        n += 1
    if was_training:
        engine.train()
    return all_reduce_mean(total / max(n, 1))
