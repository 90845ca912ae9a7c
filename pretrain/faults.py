"""Stopping cleanly: preemption signals, non-finite steps, loss spikes, and ranks that stop making progress.

Signals: SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) set a flag; at
the end of the current step all ranks agree on it (one all-reduce), save a checkpoint, write
OUT_DIR/REQUEUE and exit with status REQUEUE_EXIT (75, EX_TEMPFAIL: "try again"), which the SLURM
script turns into a requeue. A run that finishes removes a stale REQUEUE marker and exits 0.
"""
from __future__ import annotations

import faulthandler
import math
import os
import statistics
from collections import deque
import signal
import sys
import threading
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

REQUEUE_EXIT = 75
BAD_STEPS_EXIT = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Catches STOP_SIGNALS; `agreed()` is collective and true on every rank once any rank got one."""

    def __init__(self, already: Sequence[int] = ()):
        """`already`: signals caught before this was set up (during start-up)."""
        self.signum: Optional[int] = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        if already:
            self._handle(already[0], None)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f"rank {os.environ.get('RANK', '0')}: got {signal.Signals(signum).name}; checkpointing after "
                  f"this step", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([0 if self.signum is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class BadSteps:
    """Counts skipped steps. A step is *bad* when its loss is not finite, or when DeepSpeed skipped it
    for a non-finite gradient norm outside fp16. In fp16 a skip with a finite loss is the dynamic loss
    scaler backing off (normal at the start of a run): counted as an overflow, not as bad."""

    def __init__(self, limit: int, fp16: bool = False):
        self.limit, self.fp16 = limit, fp16
        self.in_a_row, self.total, self.overflows = 0, 0, 0

    def update(self, loss: float, skipped: bool) -> str:
        """Record one step: '' (applied), 'overflow' (fp16 loss-scale skip) or 'bad'."""
        finite = loss == loss and abs(loss) != float("inf")
        if skipped and finite and self.fp16:
            self.overflows += 1
            return "overflow"
        bad = skipped or not finite
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += int(bad)
        return "bad" if bad else ""

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit


class SpikeGuard:
    """Detects a loss spike: `patience` steps in a row whose (finite) loss exceeds `factor` x the
    median of the last `history` normal steps (after `history // 5` of them). Non-finite steps are
    BadSteps': DeepSpeed never applied them, so there is nothing to roll back.

    The loss is the global mean (the same on every rank), so every rank decides alike."""

    def __init__(self, factor: float, history: int, patience: int):
        self.factor, self.patience = factor, patience
        self.normal: deque = deque(maxlen=history)
        self.min_history = max(1, history // 5)
        self.windows: list = []              # the data windows of the spike's steps so far

    def update(self, loss: float, window: int) -> bool:
        """Record a step that read data window `window`; True when a spike has lasted `patience` steps."""
        if self.factor <= 0 or not math.isfinite(loss):
            return False
        if len(self.normal) >= self.min_history and loss > self.factor * statistics.median(self.normal):
            self.windows.append(window)
            return len(self.windows) >= self.patience
        self.windows = []
        self.normal.append(loss)
        return False

    def reset(self) -> list:
        """After a rollback: the spike's windows (to skip); normal history is kept."""
        windows, self.windows = self.windows, []
        return windows


class Watchdog:
    """Reports a rank whose step has not advanced for `timeout_s` (which rank, which step) and dumps
    its Python stacks, instead of hanging silently in a collective."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self.step, self.last = 0, time.monotonic()
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._run, daemon=True, name="rrwkv-watchdog").start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def _run(self) -> None:
        reported = None
        while not self._stop.wait(min(30.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s and reported != self.step:
                reported = self.step
                print(f"watchdog: rank {self.rank} has made no progress for {idle:.0f} s after step {self.step} "
                      f"(a peer rank may be dead or stuck in a collective); its stacks follow", file=sys.stderr,
                      flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def close(self) -> None:
        self._stop.set()
