"""What a training run writes beside its checkpoints and prints: config.yaml, deepspeed_config.json,
runs.jsonl, REQUEUE, the console lines of rank 0, and the lock that makes OUT_DIR one run's."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import filelock
import torch
import torch.distributed as tdist
from omegaconf import DictConfig

from .checkpoint import write_atomic
from .config import model_config, to_yaml
from .distributed import Dist
from .errors import UserError
from .metrics import run_metadata
from .plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def check_out_dir(out_dir: Path) -> None:
    """Before any heavy start-up: OUT_DIR, or the nearest folder above it that exists, is a writable folder."""
    p = out_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"run.out_dir={out_dir}: {p} is a file, not a folder; choose another run.out_dir")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"run.out_dir={out_dir}: {p} is not writable by this user; choose another run.out_dir "
                        f"or fix its permissions")


def own_out_dir(out_dir: Path, d: Dist) -> Optional[filelock.FileLock]:
    """Make OUT_DIR this run's (collective): rank 0 holds OUT_DIR/.lock for the whole run.

    The lock is an flock, which the operating system releases when its process ends, however it ends
    (kill -9 included), so a dead run's OUT_DIR is free at once and a live run's is refused with one
    line naming its host and process. Where the filesystem has no flock the run goes on with a warning.
    """
    lock, refused = None, ""
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        owner = out_dir / ".lock.owner"
        lock = filelock.FileLock(str(out_dir / ".lock"))
        try:
            lock.acquire(timeout=0)
            owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        except filelock.Timeout:
            try:
                rec = json.loads(owner.read_text())
                who = f"pid {rec['pid']} on host {rec['host']}, since {time.ctime(rec['since'])}"
            except (OSError, ValueError, KeyError):
                who = "a process that has not recorded itself"
            refused = (f"run.out_dir={out_dir} is in use by another run ({who}); wait for it to end or stop it, "
                       f"or choose another run.out_dir")
            lock = None
        except OSError as e:       # no flock on this filesystem (ENOLCK, ENOSYS, ...)
            print(f"warning: cannot lock {out_dir / '.lock'} ({e}): make sure no other run uses this "
                  f"run.out_dir", file=sys.stderr, flush=True)
            lock = None
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [refused]
        tdist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
        refused = box[0]
    if refused:
        raise UserError(refused)
    return lock


def write_run_files(cfg: DictConfig, out_dir: Path, d: Dist, plan: Optional[Plan], resumed_at: int) -> None:
    """config.yaml, the DeepSpeed config the engine was given (deepspeed_config.json) and a line of
    runs.jsonl per start (with the plan: batch layout, steps)."""
    if not d.is_main:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", to_yaml(cfg))
    if plan is not None:
        write_atomic(out_dir / "deepspeed_config.json", json.dumps(plan.deepspeed, indent=1) + "\n")
    meta = dict(run_metadata(ROOT), world_size=d.world_size, device=str(d.device), resumed_at_step=resumed_at,
                argv=sys.argv, plan=plan.summary() if plan is not None else None)
    with (out_dir / "runs.jsonl").open("a") as f:     # one line per start (first run and every resume)
        f.write(json.dumps(meta) + "\n")


def announce(cfg: DictConfig, d: Dist, plan: Plan, flops: float, peak_name: str, resume_dir, step: int) -> None:
    from .metrics import count_params
    n = count_params(model_config(cfg))
    d.say(f"model: {n / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP/token; MFU against {peak_name}; "
           f"{d.world_size} rank(s) on {d.device.type} ({plan.data_parallel} data-parallel x "
           f"{plan.pipeline_stages} pipeline stages, ZeRO-{cfg.parallel.zero_stage}); global batch "
           f"{plan.global_batch_size} x {plan.seq_len} tokens ({plan.grad_accum} accumulation steps), "
           f"{plan.max_steps} steps; "
           + (f"resumed from {resume_dir} at step {step}" if step else "fresh start"))


def mark_requeue(out_dir: Path, d: Dist, step: int) -> None:
    """OUT_DIR/REQUEUE: this run stopped on a signal after saving step `step`; start it again."""
    if d.is_main:
        write_atomic(out_dir / "REQUEUE", json.dumps({"step": step}) + "\n")
        print(f"stopped on signal after saving step {step}; wrote {out_dir / 'REQUEUE'}", flush=True)


def mark_done(out_dir: Path, d: Dist) -> None:
    if d.is_main:
        (out_dir / "REQUEUE").unlink(missing_ok=True)


def memory_stats(device: torch.device) -> Dict[str, float]:
    """Peak memory: on a GPU the peak allocated (`mem_gb`) and reserved (`mem_reserved_gb`) by the
    caching allocator, and `alloc_retries`, how often it found no free block, freed its cache (a
    device synchronization) and tried again: above 0 the card is full or fragmented and steps slow
    down (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True or a smaller micro-batch help).
    On a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return {"mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2 ** 30,
                "alloc_retries": int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))}
    try:
        import resource
        return {"mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    except ImportError:
        return {}
