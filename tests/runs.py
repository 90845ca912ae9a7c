"""Helpers for tests that launch real training runs (one process, or several through DeepSpeed)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.medium_interval=16", "data.seq_len=64",
         "data.micro_batch_size=4", "train.global_batch_size=8", "train.log_every=1", "train.eval_every=0",
         "logging.wandb.mode=disabled", "optim.warmup_steps=2"]


def env():
    return dict(os.environ)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_cmd(out_dir, cache, extra=(), ranks=1):
    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"run.out_dir={out_dir}", f"data.cache_dir={cache}",
            *SMALL, *extra]
    if ranks == 1:
        return [sys.executable, str(ROOT / "launch/pretrain.py"), *args]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(ROOT / "launch/pretrain.py"), *args]


def run(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return p


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
