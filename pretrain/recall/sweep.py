"""Sweeps of recall runs: a grid YAML expanded to runs, run N at a time as separate processes, resumable.

A grid file has `base` (settings every run shares: RecallConfig fields) and `axes` (an ordered
mapping; the runs are the product of the axes' values). A scalar value sets the field named by
its axis (`lr: [3.0e-4, 1.0e-3]`); a mapping sets several fields at once (a cell
`{seq_len: 256, kv_pairs: 16, steps: 1500}`, a model `{model: rrwkv, interval: 32, lr: 1.0e-3}`),
later axes overriding earlier ones. Each run is the CLI itself (`python -m rrwkv.pretrain.cli.recall
... --report DIR/<name>.json`, its output in DIR/<name>.log) in its own process, so one run's crash
or out-of-memory error leaves the others running; the report is written atomically at the run's
end, so a sweep started again skips exactly the runs that finished.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import yaml

from .tasks import VOCAB
from .trainer import RecallConfig


def load_grid(path: Path) -> dict:
    grid = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(grid) - {"base", "axes"}
    if unknown or not isinstance(grid.get("axes", {}), dict):
        raise ValueError(f"{path}: a grid has `base:` (a mapping) and `axes:` (a mapping of lists); "
                         f"got keys {sorted(grid)}")
    return grid


def run_name(cfg: RecallConfig) -> str:
    """A file name that tells the run apart within a sweep: task, cell, model (and interval), width x
    depth, lr, seed."""
    model = f"rrwkv-s{cfg.interval}" if cfg.model == "rrwkv" else cfg.model
    vocab = "" if cfg.vocab_size == VOCAB else f"-V{cfg.vocab_size}"
    model += ("" if cfg.tie_embeddings else "-untied") + (f"-h{cfg.heads}" if cfg.heads else "")
    return (f"{cfg.task}-L{cfg.seq_len}-K{cfg.kv_pairs}{vocab}-{model}-d{cfg.d_model}x{cfg.layers}-lr{cfg.lr:g}"
            f"-seed{cfg.seed}")


def expand(grid: dict, overrides: Optional[dict] = None) -> List[Tuple[str, RecallConfig]]:
    """(name, config) of every run of the grid, in axis order; `overrides` (fields) apply to all runs."""
    axes = grid.get("axes") or {}
    choices = []
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid axis {axis!r} must be a non-empty list")
        choices.append([v if isinstance(v, dict) else {axis: v} for v in values])
    runs, seen = [], {}
    for combo in itertools.product(*choices):
        settings = dict(grid.get("base") or {})
        for part in combo:
            settings.update(part)
        settings.update(overrides or {})
        cfg = RecallConfig.from_dict(settings)
        name = run_name(cfg)
        if name in seen and seen[name] != cfg:
            raise ValueError(f"two runs of the grid share the name {name} but differ: "
                             f"{ {k: v for k, v in cfg.to_dict().items() if seen[name].to_dict()[k] != v} }")
        if name not in seen:
            seen[name] = cfg
            runs.append((name, cfg))
    return runs


def config_argv(cfg: RecallConfig) -> List[str]:
    """The CLI options that reproduce `cfg`."""
    argv = []
    for key, value in cfg.to_dict().items():
        argv += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def run_sweep(grid_path: Path, out_dir: Path, concurrent: int = 1, overrides: Optional[dict] = None,
              log: Callable[[str], None] = print) -> int:
    """Run every run of the grid whose report is not in `out_dir` yet, `concurrent` at a time.
    Prints one line per finished run; returns 0 if all succeeded, 1 otherwise."""
    runs = expand(load_grid(grid_path), overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(n, c) for n, c in runs if not (out_dir / f"{n}.json").exists()]
    log(f"sweep {grid_path}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run, "
        f"{concurrent} at a time; reports in {out_dir}")
    env = dict(os.environ)   # share the CPU cores among the runs (host work, or the runs themselves on CPU)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, concurrent))))
    running: Dict[str, tuple] = {}
    failed = 0
    try:
        while todo or running:
            while todo and len(running) < max(1, concurrent):
                name, cfg = todo.pop(0)
                logf = open(out_dir / f"{name}.log", "w")
                cmd = [sys.executable, "-m", "rrwkv.pretrain.cli.recall", *config_argv(cfg),
                       "--report", str(out_dir / f"{name}.json")]
                logf.write(" ".join(cmd) + "\n")
                logf.flush()
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, logf, time.perf_counter())
            for name, (proc, logf, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[name]
                head = f"[{len(runs) - len(todo) - len(running)}/{len(runs)}]"
                report = out_dir / f"{name}.json"
                if proc.returncode == 0 and report.exists():
                    r = json.loads(report.read_text())
                    log(f"{head} {name}: accuracy {r['accuracy']:.4f}, {r['steps']} steps, "
                        f"{r['tokens_per_s']:.0f} tokens/s, {time.perf_counter() - t0:.1f} s")
                else:
                    failed += 1
                    log(f"{head} {name}: FAILED (exit {proc.returncode}); see {out_dir / (name + '.log')}")
            time.sleep(0.05)
    finally:   # interrupted: stop the runs this sweep started (their reports were never written)
        for proc, logf, _ in running.values():
            proc.terminate()
        for proc, logf, _ in running.values():
            proc.wait()
            logf.close()
    log(f"sweep done: {len(runs) - failed} of {len(runs)} runs have reports" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def _cell(c: dict) -> str:
    return f"{c['task']} L{c['seq_len']} K{c['kv_pairs']}"


def summarize(out_dir: Path) -> str:
    """A table of every report in `out_dir` (model, interval, d_model, cell, lr, seed -> accuracy,
    steps), each model's best lr per cell (highest mean accuracy over seeds, then fewest steps), and
    the gap task's accuracy by gap."""
    reports = []
    for p in sorted(Path(out_dir).glob("*.json")):
        r = json.loads(p.read_text())
        if isinstance(r, dict) and "config" in r and "accuracy" in r:
            reports.append(r)
    if not reports:
        return f"no reports in {out_dir}"
    key = lambda r: (r["config"]["task"], r["config"]["seq_len"], r["config"]["kv_pairs"], r["config"]["model"],  # noqa: E731
                     r["config"]["interval"], r["config"]["d_model"], r["config"]["lr"], r["config"]["seed"])
    reports.sort(key=key)
    lines = [f"{'model':<10} {'interval':>8} {'d_model':>7} {'cell':<16} {'lr':>8} {'seed':>4} {'accuracy':>8} "
             f"{'steps':>6} {'state':>8}"]
    for r in reports:
        c = r["config"]
        lines.append(f"{c['model']:<10} {c['interval']:>8} {c['d_model']:>7} {_cell(c):<16} {c['lr']:>8g} "
                     f"{c['seed']:>4} {r['accuracy']:>8.4f} {r['steps']:>6} {r['state_size']:>8}")
    groups: Dict[tuple, Dict[float, list]] = {}
    for r in reports:
        c = r["config"]
        groups.setdefault((_cell(c), c["model"], c["interval"], c["d_model"]), {}).setdefault(c["lr"], []).append(r)
    lines += ["", "best lr per model and cell (mean over seeds):",
              f"{'cell':<16} {'model':<10} {'interval':>8} {'d_model':>7} {'lr':>8} {'accuracy':>8} {'sd':>6} "
              f"{'steps':>7} {'seeds':>5}"]
    for (cell, model, interval, d), by_lr in sorted(groups.items()):
        scored = [(statistics.fmean(x["accuracy"] for x in rs), -statistics.fmean(x["steps"] for x in rs), lr, rs)
                  for lr, rs in by_lr.items()]
        acc, neg_steps, lr, rs = max(scored, key=lambda s: (s[0], s[1]))
        sd = statistics.stdev([x["accuracy"] for x in rs]) if len(rs) > 1 else 0.0
        lines.append(f"{cell:<16} {model:<10} {interval:>8} {d:>7} {lr:>8g} {acc:>8.4f} {sd:>6.3f} "
                     f"{-neg_steps:>7.0f} {len(rs):>5}")
    gap_reports = [r for r in reports if r.get("accuracy_by_gap")]
    if gap_reports:
        gaps = sorted({int(g) for r in gap_reports for g in r["accuracy_by_gap"]})
        lines += ["", "gap task: accuracy by gap (null: beyond the attention control's positions)",
                  f"{'model':<10} {'interval':>8} {'d_model':>7} {'seed':>4} " + " ".join(f"{g:>6}" for g in gaps)]
        for r in gap_reports:
            c, by = r["config"], r["accuracy_by_gap"]
            cells = [by.get(str(g)) for g in gaps]
            lines.append(f"{c['model']:<10} {c['interval']:>8} {c['d_model']:>7} {c['seed']:>4} "
                         + " ".join(f"{'null':>6}" if a is None else f"{a:>6.3f}" for a in cells))
    return "\n".join(lines)
