"""Throughput accounting (FLOPs, MFU) and the metrics sinks: metrics.jsonl, wandb, TensorBoard, console."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .errors import UserError

# Dense bf16 peaks (TFLOP/s) of common cards, by a substring of torch.cuda.get_device_name().
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def count_params(cfg, non_embedding: bool = False) -> int:
    """Parameters of an RRWKV of config `cfg` (counted on the meta device: no memory, no init)."""
    from .model import RRWKV
    with torch.device("meta"):
        return RRWKV(cfg, init_seed=None).num_params(non_embedding=non_embedding)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token (rrwkv.md): 6 N_nonembedding + 6 C V (the head).

    N_nonembedding is the parameter count without embedding and head; it includes the excitation
    layers, which run once per segment rather than per token (an overcount of under 2%). The WKV
    itself is O(C) per token and left out. `cfg`: an RRWKVConfig.
    """
    return 6.0 * count_params(cfg, non_embedding=True) + 6.0 * cfg.n_embd * cfg.vocab_size


class StepTimer:
    """Throughput over the steps since the last report: tokens/s, TFLOP/s per device, MFU, ETA.

    Saves and evaluations are left out of the window (`pause`)."""

    def __init__(self, step_tokens: int, flops_per_token: float, peak: float, devices: int,
                 recompute: bool = False):
        self.step_tokens, self.flops, self.peak, self.devices = step_tokens, flops_per_token, peak, devices
        # Hardware FLOPs: activation checkpointing runs each forward twice (8N instead of 6N per token).
        self.hw_factor = 8.0 / 6.0 if recompute else 1.0
        self.train_time, self.train_steps = 0.0, 0
        self.pause()

    def pause(self) -> None:
        self.t0, self.steps, self.data_s = time.perf_counter(), 0, 0.0

    def data_wait(self, seconds: float) -> None:
        """Time the loop spent waiting for the next batch (part of the step time)."""
        self.data_s += seconds

    def tick(self) -> None:
        self.steps += 1

    def rates(self, step: int, max_steps: int, device: torch.device) -> Dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        self.train_time, self.train_steps = self.train_time + dt, self.train_steps + self.steps
        tps = self.steps * self.step_tokens / dt
        per_device = tps * self.flops / self.devices
        eta = (max_steps - step) * self.train_time / max(self.train_steps, 1)
        row = {"tokens_per_s": tps, "tflops_per_device": per_device / 1e12, "mfu": per_device / self.peak,
               "eta_s": eta, "data_wait_frac": self.data_s / dt}
        if self.hw_factor != 1.0:
            row["hfu"] = row["mfu"] * self.hw_factor
        self.pause()
        return row


def device_peak(device: torch.device, override: Optional[float]) -> Tuple[float, str]:
    """(peak FLOP/s, its name) for MFU."""
    if override:
        return override * 1e12, f"configured {override:g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAKS.items():
            if key in name:
                return tf * 1e12, f"{name} dense bf16 {tf:g} TFLOP/s"
        return 989e12, f"unknown card {name}: H100 SXM dense bf16 989 TFLOP/s"
    return measured_cpu_peak(), "measured fp32 matmul peak of this CPU process"


def measured_cpu_peak(n: int = 512, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def run_metadata(root: Path) -> Dict[str, Any]:
    """Git revision of the code and versions of the packages that shape a run."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    pkgs = {}
    for name in ("torch", "deepspeed", "webdataset", "sentencepiece", "omegaconf", "wandb", "tensorboard", "numpy"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {"git_revision": rev, "git_dirty": dirty, "python": sys.version.split()[0], "packages": pkgs,
            "cuda": torch.version.cuda}


def check_logging(cfg) -> None:
    """Before start-up, on every rank: the packages the logging.* sinks need are installed."""
    if cfg.logging.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise UserError(f"logging.tensorboard=true needs the tensorboard package ({e}): pip install "
                            f"'rrwkv-pretrain[tensorboard]' (or tensorboard>=2.14), or set logging.tensorboard=false") \
                from None


def scalars(row: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of a metrics row, nested mappings flattened as "tokens_by_source/NAME" (wandb and
    TensorBoard keys); strings, booleans and lists are left out."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}/{name}": x for name, x in scalars(v).items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


class MetricsLogger:
    """Rank-0 sink for training rows: metrics.jsonl (appended), wandb, TensorBoard, and the console."""

    def __init__(self, out_dir: Path, cfg, max_steps: int, start_step: int, enabled: bool, wandb_id: Optional[str]):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tensorboard_dir = out_dir / "tensorboard"
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        if start_step > 0:
            self._drop_rows_after(start_step)
        if cfg.logging.tensorboard:
            self._open_tensorboard(start_step)
        mode = cfg.logging.wandb.mode
        if mode != "disabled":
            import wandb
            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
            self.wandb = wandb.init(project=cfg.logging.wandb.project, name=cfg.logging.wandb.name, mode=mode,
                                    dir=str(out_dir), id=self.wandb_id, resume="allow",
                                    config=_plain(cfg), settings=wandb.Settings(silent=True))
        if cfg.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their earlier rows."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def _open_tensorboard(self, last_step: int) -> None:
        """A SummaryWriter appending to OUT_DIR/tensorboard. After a resume or rollback to `last_step`,
        its purge_step hides the events of the later steps written before (by an earlier process, or by
        this one before a rollback): they are redone, as metrics.jsonl drops their rows on resume."""
        from torch.utils.tensorboard import SummaryWriter
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.tensorboard = SummaryWriter(str(self.tensorboard_dir), purge_step=last_step + 1 if last_step else None)

    def log(self, row: Dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = scalars(row)
        if self.wandb is not None:
            self.wandb.log(numbers, step=row.get("step"))
        if self.tensorboard is not None:
            if row.get("event") == "rollback":        # the steps after to_step are redone from here on
                self._open_tensorboard(row["to_step"])
            else:
                for tag, value in numbers.items():
                    if tag != "step":
                        self.tensorboard.add_scalar(tag, value, global_step=row.get("step"))
                self.tensorboard.flush()
        if self.bar is not None and "loss" in row:
            self.bar.n = row["step"]
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")
            self.bar.refresh()
        if console:
            text = " ".join(_fmt(k, v) for k, v in row.items() if k not in ("time",) and not isinstance(v, dict))
            text += "".join(f" {_fmt(k, v)}" for k, v in scalars({k: v for k, v in row.items()
                                                                  if isinstance(v, dict)}).items())
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _fmt(k: str, v: Any) -> str:
    if isinstance(v, float):
        return f"{k}={v:.4g}" if abs(v) < 1e5 else f"{k}={v:.3e}"
    return f"{k}={v}"


def _plain(cfg) -> Dict[str, Any]:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)
