#!/usr/bin/env python
"""One study run's result file: its training summary (from OUT_DIR) and its evaluation report, in one JSON.

    python benchmarks/long_range/summarize.py --name NAME --seed S --run-dir OUT_DIR --output FILE.json
        [--eval EVAL.json] [--train-exit N] [--eval-exit N] [--timing key=seconds ...]
        [--pilot] [--overrides "k=v ..."] [--corpus DIR]

Training figures come from OUT_DIR/metrics.jsonl: `tokens_per_s_median` is the median of the logged
throughput windows, leaving out the first window after each start (it holds the kernel build and
warm-up); `final_train_loss` is the mean of the last five logged training losses.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FORMAT = 1


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                fail(f"{path}:{n} is not JSON; the run's files are damaged")
    return rows


def training_summary(run_dir: Path, steps_planned: int, step_tokens: int) -> dict:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    starts = [r.get("resumed_at_step", 0) for r in read_jsonl(run_dir / "runs.jsonl")] or [0]
    train = {}
    for r in rows:                                   # the last row of a step wins (a resume redoes steps)
        if "loss" in r and "tokens_per_s" in r:
            train[r["step"]] = r
    if not train:
        fail(f"{run_dir}/metrics.jsonl holds no training rows: did training start?")
    steps = sorted(train)
    first_after_start = {min((s for s in steps if s > start), default=None) for start in starts}
    timed = [train[s] for s in steps if s not in first_after_start]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    last = train[steps[-1]]
    done = steps[-1]
    if (run_dir / "REQUEUE").is_file():              # stopped on a signal after saving this step
        done = max(done, int(json.loads((run_dir / "REQUEUE").read_text())["step"]))
    out = {
        "steps_planned": steps_planned, "steps_done": done, "tokens": done * step_tokens,
        "complete": done >= steps_planned,
        "starts": len(starts),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed) if timed else None,
        "tokens_per_s_windows": len(timed),
        "mfu_median": statistics.median(r["mfu"] for r in timed) if timed and "mfu" in timed[0] else None,
        "final_train_loss": statistics.fmean(train[s]["loss"] for s in steps[-5:]),
        "final_val_loss": val[max(val)] if val else None,
        "skipped_steps": last.get("skipped_steps"), "mem_gb": last.get("mem_gb"),
        "curve": [[s, round(train[s]["loss"], 5)] for s in steps],
        "val_curve": [[s, round(v, 5)] for s, v in sorted(val.items())],
    }
    return out


def model_info(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from rrwkv.pretrain.metrics import count_params
    from rrwkv.pretrain.model import RRWKVConfig
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        fail(f"{cfg_file} not found: {run_dir} is not a training run's OUT_DIR")
    cfg = OmegaConf.load(cfg_file)
    model = RRWKVConfig(**{f.name: cfg.model[f.name] for f in dataclasses.fields(RRWKVConfig)})
    return {"model_config": dataclasses.asdict(model), "params": count_params(model),
            "params_non_embedding": count_params(model, non_embedding=True),
            "global_batch_size": int(cfg.train.global_batch_size or cfg.data.micro_batch_size),
            "seq_len": int(cfg.data.seq_len), "precision": str(cfg.train.precision),
            "max_steps": int(cfg.train.max_steps)}


def device_info(run_dir: Path) -> dict:
    starts = read_jsonl(run_dir / "runs.jsonl")
    meta = starts[-1] if starts else {}
    dev = {"type": str(meta.get("device", "unknown")).split(":")[0]}
    if dev["type"] == "cuda":
        import torch
        if torch.cuda.is_available():
            dev["name"] = torch.cuda.get_device_name(0)
    versions = {k: meta.get(k) for k in ("git_revision", "git_dirty", "python", "packages", "cuda")}
    return {"device": dev, "versions": versions}


def corpus_info(corpus: Path | None) -> dict | None:
    if corpus is None or not (corpus / "corpus.json").is_file():
        return None
    info = json.loads((corpus / "corpus.json").read_text())
    return {"files": {k: v["sha256"] for k, v in info.get("files", {}).items()},
            "train_tokens": info.get("splits", {}).get("train", {}).get("tokens")}


def parse_timing(items) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key] = round(float(value), 1)
        except ValueError:
            sep = ""
        if not sep:
            fail(f"--timing takes key=seconds, got {item!r}")
    return out


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--eval", default=None, help="launch/evaluate.py's report (absent: evaluation did not finish)")
    p.add_argument("--train-exit", type=int, default=0)
    p.add_argument("--eval-exit", type=int, default=0)
    p.add_argument("--timing", nargs="*", help="wall seconds of the phases, key=seconds")
    p.add_argument("--pilot", action="store_true", help="a pilot of the scripts (CPU / changed model), not the study")
    p.add_argument("--overrides", default="", help="the extra key=value overrides the run was given")
    p.add_argument("--corpus", default=None)
    p.add_argument("--shared-gpu", type=int, default=1,
                   help="how many study runs shared the GPU (their tokens/s and wall times are not comparable)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    report = None
    if args.eval and Path(args.eval).is_file():
        try:
            report = json.loads(Path(args.eval).read_text())
        except json.JSONDecodeError:
            fail(f"{args.eval} is not JSON")
    model = model_info(run_dir)
    summary = {
        "format": FORMAT, "study": "long_range", "name": args.name, "seed": args.seed,
        "pilot": bool(args.pilot), "overrides": args.overrides.split(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **model, **device_info(run_dir), "corpus": corpus_info(Path(args.corpus) if args.corpus else None),
        "train": {**training_summary(run_dir, model["max_steps"], model["global_batch_size"] * model["seq_len"]),
                  "exit_status": args.train_exit},
        "wall_s": parse_timing(args.timing), "shared_gpu": args.shared_gpu,
        "eval": report, "eval_exit_status": args.eval_exit,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out)
    t = summary["train"]
    tps = f"{t['tokens_per_s_median']:,.0f}" if t["tokens_per_s_median"] else "n/a"
    print(f"{args.name} seed {args.seed}: {summary['params'] / 1e6:.2f}M parameters, step {t['steps_done']}"
          f"/{t['steps_planned']}, train loss {t['final_train_loss']:.4f}, {tps} tokens/s"
          + (f", val loss {report['loss']:.4f}" if report else ", no evaluation") + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
