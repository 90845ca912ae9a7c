"""A light trainer for many small recall runs on one device: plain PyTorch, no DeepSpeed.

Fresh synthetic data every step (generated on the device), AdamW with linear warmup and a cosine
decay to 0.1 x lr, bf16 autocast on CUDA (fp32 on CPU), evaluation every `eval_every` steps on a
fixed held-out set (drawn once from a separate seed), early stop once its accuracy reaches
`target`. Per-step host work is kept to launching kernels: the batch carries its answer positions,
so the loss needs no boolean masking, and nothing is read back from the device between evaluations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .models import MODELS, answer_logits, build_model, is_recurrent, state_size
from .tasks import VOCAB, RecallBatch, check_mqar, gap_batch, mqar_batch

TASKS = ("mqar", "gap")
DEFAULT_GAPS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
EVAL_SEED = 1_000_003          # held-out data: seed + EVAL_SEED (+ the gap for the gap-by-gap sets)


@dataclass
class RecallConfig:
    """One run. Every field is a CLI option (`--seq-len` for seq_len) and a sweep-grid key."""
    task: str = "mqar"
    seq_len: int = 64
    kv_pairs: int = 4
    model: str = "attention"
    interval: int = 0                 # rrwkv's medium interval S
    d_model: int = 64
    layers: int = 2
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 64
    warmup: int = 50
    weight_decay: float = 0.1         # on matrices only (not LayerNorms, decays, mixes)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_samples: int = 512
    eval_batch_size: int = 0          # 0: batch_size
    gaps: List[int] = field(default_factory=lambda: list(DEFAULT_GAPS))   # gap task: test gaps
    target: float = 0.99              # early stop at this held-out accuracy
    vocab_size: int = VOCAB
    power_a: float = 0.01
    tie_embeddings: bool = True       # the head shares the embedding matrix (as Zoology's models)
    heads: int = 0                    # attention control's heads (0: max(2, d_model // 64))
    random_non_queries: bool = False  # MQAR: noise (True) or token 0 (Zoology's figure 2) between queries
    device: str = "auto"              # auto: cuda when available
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; one of {', '.join(TASKS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; one of {', '.join(MODELS)}")
        if self.model != "rrwkv":
            self.interval = 0
        elif self.interval <= 0:
            raise ValueError("--model rrwkv needs --interval S > 0")
        for name in ("seq_len", "kv_pairs", "d_model", "layers", "steps", "batch_size", "eval_every", "eval_samples"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        self.gaps = sorted(int(g) for g in self.gaps)
        if self.task == "mqar":
            check_mqar(self.seq_len, self.kv_pairs, self.vocab_size)
        elif self.seq_len < 3 * self.kv_pairs:
            raise ValueError(f"gap: --seq-len ({self.seq_len}) must be at least 3 x --kv-pairs ({3 * self.kv_pairs})")

    @classmethod
    def from_dict(cls, d: dict) -> "RecallConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recall settings {unknown}; valid: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def make_batch(cfg: RecallConfig, batch: int, gen: torch.Generator, device, gap: Optional[int] = None) -> RecallBatch:
    """A training-distribution batch of the config's task (or, with `gap`, a gap-task test batch)."""
    if cfg.task == "mqar":
        return mqar_batch(batch, cfg.seq_len, cfg.kv_pairs, gen, device, cfg.vocab_size, cfg.power_a,
                          cfg.random_non_queries)
    if gap is not None:
        return gap_batch(batch, cfg.kv_pairs, gen, device, gap=gap, vocab_size=cfg.vocab_size)
    return gap_batch(batch, cfg.kv_pairs, gen, device, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)


def lr_at(step: int, cfg: RecallConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to 0.1 lr at `steps` (step counts from 1)."""
    warm = min(cfg.warmup, cfg.steps)
    if step <= warm:
        return cfg.lr * step / max(1, warm)
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def optimizer(model: torch.nn.Module, cfg: RecallConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: RecallBatch, micro_batch: int, device: torch.device,
             chunk: Optional[int] = None) -> Tuple[float, float]:
    """(exact-match accuracy per query, mean cross-entropy at the answers) over `batch`, in slices of
    `micro_batch` sequences; recurrent models in chunks of `chunk` tokens with carried state."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device)
    for a in range(0, batch.inputs.shape[0], micro_batch):
        sl = slice(a, a + micro_batch)
        with autocast(device):
            logits = answer_logits(model, batch.inputs[sl], batch.positions[sl], chunk).float()
        answers = batch.answers[sl]
        correct += (logits.argmax(-1) == answers).sum()
        loss += F.cross_entropy(logits.flatten(0, 1), answers.flatten(), reduction="sum")
    model.train(was_training)
    n = batch.answers.numel()
    return correct.item() / n, loss.item() / n


def train(cfg: RecallConfig, log: Callable[[str], None] = print) -> Tuple[dict, torch.nn.Module]:
    """Train one run; returns its report (see write_report's keys) and the trained model."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.vocab_size, cfg.d_model, cfg.layers, cfg.seq_len, cfg.interval,
                        cfg.seed, cfg.tie_embeddings, cfg.heads).to(device)
    opt = optimizer(model, cfg, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    heldout = make_batch(cfg, cfg.eval_samples, torch.Generator(device).manual_seed(cfg.seed + EVAL_SEED), device)
    micro = cfg.eval_batch_size or cfg.batch_size
    curve, acc, vloss, train_s, step = [], 0.0, float("nan"), 0.0, 0
    loss_sum = torch.zeros((), device=device)
    since, t0 = 0, time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = make_batch(cfg, cfg.batch_size, gen, device)
        with autocast(device):
            logits = answer_logits(model, batch.inputs, batch.positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.answers.flatten())
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        since += 1
        if step % cfg.eval_every and step != cfg.steps:
            continue
        train_loss = loss_sum.item() / since      # the step's only read-back: at evaluation points
        train_s += time.perf_counter() - t0
        acc, vloss = evaluate(model, heldout, micro, device)
        curve.append({"step": step, "accuracy": acc, "loss": vloss, "train_loss": train_loss,
                      "elapsed_s": round(time.perf_counter() - start, 3)})
        log(f"step {step}: accuracy {acc:.4f}, held-out loss {vloss:.4f}, train loss {train_loss:.4f}")
        loss_sum.zero_()
        since, t0 = 0, time.perf_counter()
        if acc >= cfg.target:
            break
    report = {
        "accuracy": acc, "loss": vloss, "steps": step, "stopped_early": step < cfg.steps,
        "tokens_per_s": step * cfg.batch_size * cfg.seq_len / max(train_s, 1e-9),
        "state_size": state_size(model, cfg.seq_len),
        "state_size_note": ("floats carried per layer (recurrent state)" if is_recurrent(model) else
                            f"KV cache floats per layer at the evaluated length {cfg.seq_len} (2 x d_model x T)"),
        "params": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": sum(p.numel() for n, p in model.named_parameters()
                                    if not n.startswith(("emb.", "head.", "pos."))),
        "config": dict(cfg.to_dict(), device=str(device)),
        "curve": curve,
        "train_s": round(train_s, 3),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if cfg.task == "gap":
        report["accuracy_by_gap"], report["loss_by_gap"] = gap_accuracy(model, cfg, device, micro, log)
    report["wall_s"] = round(time.perf_counter() - start, 3)
    return report, model


def gap_accuracy(model: torch.nn.Module, cfg: RecallConfig, device: torch.device, micro: int,
                 log: Callable[[str], None] = print):
    """Accuracy and loss at each test gap on fresh held-out sequences (3K + gap tokens). Recurrent models
    run them in chunks of the training length with carried state; the attention control only where the
    whole sequence fits its training length (its learned positions end there): null beyond."""
    accuracy, loss = {}, {}
    for g in cfg.gaps:
        if not is_recurrent(model) and 3 * cfg.kv_pairs + g > cfg.seq_len:
            accuracy[str(g)] = loss[str(g)] = None
            continue
        gen = torch.Generator(device).manual_seed(cfg.seed + EVAL_SEED + 1 + g)
        batch = make_batch(cfg, cfg.eval_samples, gen, device, gap=g)
        accuracy[str(g)], loss[str(g)] = evaluate(model, batch, micro, device, chunk=cfg.seq_len)
        log(f"gap {g}: accuracy {accuracy[str(g)]:.4f}, loss {loss[str(g)]:.4f}")
    return accuracy, loss


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` as JSON to `path` all at once (a temporary file in the same folder, then a rename):
    a reader, or a resumed sweep, sees either no file or the whole report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
