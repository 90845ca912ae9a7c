#!/usr/bin/env python
"""The one driver of the GPU experiments: runs what a file in benchmarks/experiments/ describes.

    python benchmarks/run.py EXPERIMENT [--out DIR] [--only RUN ...] [--skip RUN ...] [--set KEY=VALUE ...]
                             [--tiny] [--dry-run] [--timeout S] [--gpus N] [--variant DIR ...] [--baseline-csrc DIR]
    python benchmarks/run.py --list
    python benchmarks/run.py make-variant DIR [--rev REV] NAME=VALUE ...

On the GPU machine, from the repository root: `source benchmarks/on_device.sh && python benchmarks/run.py
1b5_mfu --out $OUT`. EXPERIMENT is a name in benchmarks/experiments/ (or a path to such a YAML file).
Into --out (default runs/EXPERIMENT) go env.txt (date, GPUs and topology, versions, CPUs, memory, the
commit and a hash of kernels/csrc, the WKV kernel's build time), ds_report.txt, per run NAME.log (its
whole output) and, for launch/benchmark.py runs, NAME.json (its results) with NAME.estimate.json and
NAME.estimate.txt beside it (benchmarks/memory_estimate.py's plan of the same run), for
launch/pretrain.py runs NAME.metrics.jsonl; then summary.txt, the table printed at the end (one line
per model of each run: tokens/s, MFU, synchronized phases, peak allocated and reserved memory, allocator
retries), and scaling.json for experiments that measure scaling. Each run is capped by its timeout
(540 s unless the experiment or --timeout says otherwise): a hung collective must not eat the whole
lease. Exit status 0 when every run that ran succeeded (a run that ran out of memory counts as
succeeded when its fallback run did).

--tiny is the CPU check of an experiment's code paths, not a measurement: the same commands with a
4-layer width-64 model, data.seq_len and model.ctx_len divided by 64, gloo ranks instead of GPUs and at
most 2 of them (so a run on 4 or 8 GPUs runs on 2, and a run whose shrunk command repeats an earlier
one is skipped), no WKV kernel build. --dry-run prints the commands and runs nothing. --gpus N skips
the runs that need more than N GPUs (default: the GPUs nvidia-smi lists; no limit without it).
--set adds config overrides to every run that takes a config (e.g. `--set model.compile=true`,
`--set parallel.offload=all`, `--set train.max_steps=20`).

The kernel experiment's A/B options: --baseline-csrc DIR (another version of kernels/csrc, timed in
the same run) and --variant DIR (copies of kernels/csrc with other macro defaults, built while the
tests run, then compared kernel by kernel). `make-variant` writes such a copy: each NAME=VALUE
replaces the one `#define NAME ...` line of kernels/csrc (the macros meant for this are wrapped in
#ifndef: WKV_SUB, WKV_WIN, WKV_NBUF, WKV_GROUP_MIN, WKV_MINB_*, U, UB, SB, SBT); a NAME defined on no
line, or on several, stops it with nothing written; --rev takes the sources of a git revision
(`git archive`) instead of the working tree's. For example, here before the device call:
    python benchmarks/run.py make-variant .kvar/sub4 WKV_SUB=4 WKV_MINB_BWD_OUT=7
then on the device (carry .kvar):
    python benchmarks/run.py kernel --out $OUT --variant .kvar/sub4/kernels/csrc

Experiment files (YAML). Top level:
  description   what it measures and why (text)
  gpus          the most GPUs one of its runs needs (the machine to ask for)
  doc           the doc section its results feed
  time          how long it took or should take (text, optional)
  config        model configs merged after configs/tiny.yaml (list)
  overrides     config overrides of every run (list of KEY=VALUE)
  tiny_overrides  overrides added after the shrink on the tiny check (list)
  setup         commands run once before the runs (list of argument lists)
  build_kernel  build the WKV kernel once, timed, before the runs (default true; never on --tiny)
  scaling       true: write scaling.json, tokens/s per run against the run with the fewest ranks
  runs          list of runs, each with:
    name        unique; the NAME of its files
    ranks       processes (GPUs) of the run (default 1)
    script      launch/benchmark.py (default) or launch/pretrain.py, started by `launcher`
    launcher    deepspeed (default: `deepspeed --num_gpus RANKS`) or python (one process)
    args        the script's own options (list)
    config      replaces the experiment's config list for this run
    overrides   this run's config overrides, after the experiment's (list)
    cmd         instead of script: a whole command (argument list), run as it is
    env         environment variables of the run (mapping)
    timeout     seconds (default 540)
    fallback_for  NAME: run only if run NAME stopped for lack of GPU memory
    optional    true: run only when named in --only
    tiny        false: left out of the --tiny check
    estimate    false: no memory estimate (default: one for launch/benchmark.py runs)
    out_dir     true (launch/pretrain.py): run.out_dir in a scratch folder, metrics.jsonl kept
    when        variants | baseline_csrc: run only when that option is given
    foreach     variants: one process per --variant, {item} being its folder
    background  true: started, not waited for, until a run that `needs` it (or the end)
    needs       names of background runs to wait for first
    show        all: print the output as it comes (default for cmd runs); summary: key lines after
    memory      the planned (and measured) peak per GPU (text, for the reader)
    note        anything else for the reader (text)
In strings: {python} this interpreter, {out} the output folder, {scratch} a scratch folder of this
invocation, {ranks} / {K*ranks} the run's ranks (times K), {baseline_csrc}, {variants}, {item}. An
argument naming an option that was not given ({baseline_csrc} without --baseline-csrc) is left out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "benchmarks" / "experiments"
BENCHMARK, PRETRAIN = "launch/benchmark.py", "launch/pretrain.py"
BASE_CONFIG = "configs/tiny.yaml"
# Every config run: bf16, torch's fused CUDA AdamW (optim.fused_adam=false: DeepSpeed's FusedAdam would be
# JIT-built first, about a minute of the lease), no wandb; benchmark.py never saves checkpoints.
COMMON = ["train.precision=bf16", "optim.fused_adam=false", "logging.wandb.mode=disabled"]
# --tiny: tiny widths; layouts, ZeRO stages and micro-batch counts stay.
SHRINK = ["model.n_layer=4", "model.n_embd=64", "model.vocab_size=512", "model.medium_interval=16",
          "model.se_reduction=16"]
SEQ_KEYS, TINY_SEQ_DIV, TINY_MAX_RANKS = ("data.seq_len", "model.ctx_len"), 64, 2
DEFAULT_TIMEOUT = 540
KILL_AFTER = 30
# Lines of a benchmark or training log worth showing after the run (the rest is in NAME.log).
KEY_LINES = re.compile(r'^\{"device|^model |^rrwkv|^sdpa|^pipeline:|^RRWKV /|^error|^step|^done|out of memory|Error')
OOM = re.compile(r"out of memory|OutOfMemoryError", re.I)

EXPERIMENT_KEYS = {"description", "gpus", "doc", "time", "config", "overrides", "tiny_overrides", "setup",
                   "build_kernel", "scaling", "runs"}
RUN_KEYS = {"name", "ranks", "script", "launcher", "args", "config", "overrides", "cmd", "env", "timeout",
            "fallback_for", "optional", "tiny", "estimate", "out_dir", "when", "foreach", "background", "needs",
            "show", "memory", "note"}
OPTIONS = ("baseline_csrc", "variants")           # the values of --baseline-csrc and --variant
OPTION_FLAGS = {"baseline_csrc": "--baseline-csrc", "variants": "--variant"}
PLACEHOLDER = re.compile(r"\{([a-z_]+|\d+\*ranks|ranks\*\d+)\}")
NAMES = {"python", "out", "scratch", "ranks", "item", *OPTIONS}


class ExperimentError(Exception):
    pass


# ---------------------------------------------------------------- experiment files

def experiment_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    q = EXPERIMENTS / f"{name}.yaml"
    if q.is_file():
        return q
    known = ", ".join(sorted(x.stem for x in EXPERIMENTS.glob("*.yaml")))
    raise ExperimentError(f"no experiment '{name}' (benchmarks/experiments/: {known})")


def _strings(value, what: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                              for x in value):
        raise ExperimentError(f"{what} must be a list of strings")
    return [str(x) for x in value]


def _placeholders_known(items: List[str], what: str):
    for s in items:
        for m in PLACEHOLDER.finditer(s):
            if m.group(1) not in NAMES and "ranks" not in m.group(1):
                raise ExperimentError(f"{what}: unknown placeholder {{{m.group(1)}}} in '{s}'")


def load_experiment(path) -> dict:
    """The experiment file, checked: known keys, the right types, runs that refer to runs that exist."""
    path = Path(path)
    try:
        exp = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(exp, dict):
        raise ExperimentError(f"{path}: must be a mapping")
    where = path.name
    unknown = set(exp) - EXPERIMENT_KEYS
    if unknown:
        raise ExperimentError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(EXPERIMENT_KEYS)})")
    for key in ("description", "gpus", "doc", "runs"):
        if key not in exp:
            raise ExperimentError(f"{where}: '{key}' is missing")
    if not isinstance(exp["gpus"], int) or exp["gpus"] < 1:
        raise ExperimentError(f"{where}: gpus must be a positive integer")
    exp["name"] = path.stem
    for key in ("config", "overrides", "tiny_overrides"):
        exp[key] = _strings(exp.get(key, []), f"{where}: {key}")
    exp["setup"] = [_strings(c, f"{where}: setup command") for c in exp.get("setup", [])]
    exp.setdefault("build_kernel", True)
    exp.setdefault("scaling", False)
    if not isinstance(exp["runs"], list) or not exp["runs"]:
        raise ExperimentError(f"{where}: runs must be a non-empty list")
    seen: Dict[str, dict] = {}
    for i, run in enumerate(exp["runs"]):
        if not isinstance(run, dict) or "name" not in run:
            raise ExperimentError(f"{where}: run {i + 1} must be a mapping with a name")
        name = str(run["name"])
        what = f"{where}, run {name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ExperimentError(f"{what}: a name of letters, digits, '_', '.', '-' only")
        if name in seen:
            raise ExperimentError(f"{what}: a second run of that name")
        unknown = set(run) - RUN_KEYS
        if unknown:
            raise ExperimentError(f"{what}: unknown keys {sorted(unknown)} (known: {sorted(RUN_KEYS)})")
        run["name"] = name
        run.setdefault("ranks", 1)
        if not isinstance(run["ranks"], int) or not 1 <= run["ranks"] <= exp["gpus"]:
            raise ExperimentError(f"{what}: ranks must be an integer from 1 to the experiment's gpus "
                                  f"({exp['gpus']})")
        if "cmd" in run:
            if any(k in run for k in ("script", "launcher", "args", "config", "overrides", "out_dir")):
                raise ExperimentError(f"{what}: a cmd run takes no script, launcher, args, config, overrides "
                                      "or out_dir")
            run["cmd"] = _strings(run["cmd"], f"{what}: cmd")
            if not run["cmd"]:
                raise ExperimentError(f"{what}: cmd is empty")
            run.setdefault("show", "all")
            run.setdefault("estimate", False)
        else:
            run.setdefault("script", BENCHMARK)
            if run["script"] not in (BENCHMARK, PRETRAIN):
                raise ExperimentError(f"{what}: script must be {BENCHMARK} or {PRETRAIN}")
            run.setdefault("launcher", "deepspeed")
            if run["launcher"] not in ("deepspeed", "python"):
                raise ExperimentError(f"{what}: launcher must be deepspeed or python")
            if run["launcher"] == "python" and run["ranks"] != 1:
                raise ExperimentError(f"{what}: the python launcher runs one process (ranks 1)")
            for key in ("args", "overrides"):
                run[key] = _strings(run.get(key, []), f"{what}: {key}")
            if "config" in run:
                run["config"] = _strings(run["config"], f"{what}: config")
            run.setdefault("show", "summary")
            run.setdefault("estimate", run["script"] == BENCHMARK)
            run.setdefault("out_dir", False)
            if run["out_dir"] and run["script"] != PRETRAIN:
                raise ExperimentError(f"{what}: out_dir is for {PRETRAIN} runs")
        env = run.setdefault("env", {})
        if not isinstance(env, dict):
            raise ExperimentError(f"{what}: env must be a mapping")
        run["env"] = {str(k): str(v) for k, v in env.items()}
        run.setdefault("timeout", DEFAULT_TIMEOUT)
        if not isinstance(run["timeout"], (int, float)) or run["timeout"] <= 0:
            raise ExperimentError(f"{what}: timeout must be a positive number of seconds")
        if run["show"] not in ("all", "summary"):
            raise ExperimentError(f"{what}: show must be all or summary")
        for key in ("optional", "background"):
            run.setdefault(key, False)
        run.setdefault("tiny", True)
        if run.get("when") not in (None, *OPTIONS):
            raise ExperimentError(f"{what}: when must be one of {OPTIONS}")
        if run.get("foreach") not in (None, "variants"):
            raise ExperimentError(f"{what}: foreach must be variants")
        fb = run.get("fallback_for")
        if fb is not None and (fb not in seen or seen[fb].get("fallback_for") or seen[fb].get("foreach")):
            raise ExperimentError(f"{what}: fallback_for must name an earlier run that is neither a fallback "
                                  "itself nor a foreach run")
        needs = run.setdefault("needs", [])
        for n in _strings(needs, f"{what}: needs"):
            if n not in seen or not seen[n]["background"]:
                raise ExperimentError(f"{what}: needs '{n}', which is not an earlier background run")
        items = [*run.get("cmd", []), *run.get("args", []), *run.get("overrides", []), *run["env"].values()]
        _placeholders_known(items, what)
        seen[name] = run
    _placeholders_known([*exp["overrides"], *exp["tiny_overrides"], *(a for c in exp["setup"] for a in c)], where)
    return exp


# ---------------------------------------------------------------- commands

def _key(ov: str) -> str:
    return ov.split("=", 1)[0]


def tiny_seq(ov: str) -> str:
    """data.seq_len / model.ctx_len divided by 64 on the tiny check."""
    k, _, v = ov.partition("=")
    if k in SEQ_KEYS and v.isdigit():
        return f"{k}={max(int(v) // TINY_SEQ_DIV, 1)}"
    return ov


def expand(s: str, ctx: dict, ranks: int = 1, item: Optional[str] = None) -> Optional[List[str]]:
    """The argument(s) a string stands for; None when it names an option that was not given."""
    if s == "{variants}":                        # one argument per folder
        if not ctx["variants"] and ctx["dry_run"]:
            return ["<--variant DIR ...>"]
        return list(ctx["variants"])
    out = s
    for m in PLACEHOLDER.finditer(s):
        name = m.group(1)
        if name == "ranks":
            value = str(ranks)
        elif "ranks" in name:
            value = str(ranks * int(name.replace("ranks", "").replace("*", "")))
        elif name == "item":
            value = item if item is not None else "<variant>"
        elif name in OPTIONS:
            value = ctx[name]
            if not value:
                return None
            if name == "variants":
                value = " ".join(value)
        else:
            value = str(ctx[name])
        out = out.replace(m.group(0), value)
    return [out]


def expand_all(items: List[str], ctx: dict, ranks: int = 1, item: Optional[str] = None) -> List[str]:
    out: List[str] = []
    for s in items:
        out += expand(s, ctx, ranks, item) or []
    return out


def deepspeed_launcher() -> List[str]:
    here = Path(sys.executable).parent / "deepspeed"
    if here.is_file():
        return [str(here)]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Step:
    """One process to start: a run of the experiment (or one of a foreach run's processes)."""
    run: dict
    name: str
    cmd: List[str]
    env: Dict[str, str]
    ranks: int
    estimate: Optional[List[str]] = None
    json: Optional[Path] = None
    metrics_from: Optional[Path] = None
    skip: Optional[str] = None
    condition: Optional[str] = None             # shown on --dry-run
    # filled in when run
    rc: Optional[int] = None
    seconds: float = 0.0
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    oom: bool = False
    extra: Dict[str, str] = field(default_factory=dict)


def plan(exp: dict, a, ctx: dict) -> List[Step]:
    """The steps of the experiment, with their commands, in order; skipped ones carry the reason."""
    out, tiny, py = ctx["out"], a.tiny, sys.executable
    only = set(a.only or [])
    names = {r["name"] for r in exp["runs"]}
    for n in only | set(a.skip or []):
        if n not in names:
            known = ", ".join(r["name"] for r in exp["runs"])
            raise ExperimentError(f"no run '{n}' in {exp['name']} (runs: {known})")
    steps, seen_tiny = [], {}
    for run in exp["runs"]:
        name = run["name"]
        ranks = min(run["ranks"], TINY_MAX_RANKS) if tiny else run["ranks"]
        skip = None
        if only and name not in only:
            skip = "not in --only"
        elif run["optional"] and name not in only:
            skip = "optional: name it in --only"
        elif name in (a.skip or []):
            skip = "--skip"
        elif tiny and not run["tiny"]:
            skip = "not on the tiny check"
        elif not tiny and ctx["gpus"] is not None and run["ranks"] > ctx["gpus"]:
            skip = f"needs {run['ranks']} GPUs, this machine has {ctx['gpus']}"
        elif run.get("when") and not ctx[run["when"]] and not a.dry_run:
            skip = f"only with {OPTION_FLAGS[run['when']]}"
        condition = None
        if run.get("when"):
            condition = f"only with {OPTION_FLAGS[run['when']]}"
        if run.get("fallback_for"):
            condition = f"only if {run['fallback_for']} runs out of GPU memory"
        env = {k: " ".join(expand_all([v], ctx, ranks)) for k, v in run["env"].items()}
        if "cmd" in run:
            items = ctx["variants"] if run.get("foreach") else [None]
            if run.get("foreach") and not items:
                items = ["<variant>"] if a.dry_run else []
                if not a.dry_run and not skip:
                    skip = "only with --variant"
            for i, item in enumerate(items or [None]):
                sub = f"{name}_{i + 1}" if run.get("foreach") and items else name
                e = {k: " ".join(expand_all([v], ctx, ranks, item)) for k, v in run["env"].items()}
                steps.append(Step(run, sub, expand_all(run["cmd"], ctx, ranks, item), e, ranks, skip=skip,
                                  condition=condition))
            continue
        configs = run.get("config", exp["config"])
        overrides = [*COMMON, *exp["overrides"], *run["overrides"], *(a.set or [])]
        overrides = expand_all(overrides, ctx, ranks)
        if tiny:
            overrides = [tiny_seq(o) for o in overrides] + SHRINK + expand_all(exp["tiny_overrides"], ctx, ranks)
        metrics_from = None
        if run["out_dir"]:
            metrics_from = Path(ctx["scratch"]) / name
            overrides.append(f"run.out_dir={metrics_from}")
        config_args = ["--config", BASE_CONFIG] + [x for c in configs for x in ("--config", c)]
        args = expand_all(run["args"], ctx, ranks)
        if tiny and not skip:
            key = (ranks, run["script"], run["launcher"], tuple(config_args), tuple(args),
                   tuple(o for o in overrides if not o.startswith("run.out_dir=")), tuple(sorted(env.items())))
            if key in seen_tiny:
                skip = f"on the tiny check the same command as {seen_tiny[key]}"
            seen_tiny.setdefault(key, name)
        json_path = out / f"{name}.json" if run["script"] == BENCHMARK else None
        launcher = ([*deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port())]
                    if run["launcher"] == "deepspeed" else [py])
        cmd = [*launcher, run["script"], *(["--json", str(json_path)] if json_path else []), *config_args, *args,
               *overrides]
        estimate = None
        if run["estimate"]:
            estimate = [py, "benchmarks/memory_estimate.py", "--gpus", str(ranks), "--json",
                        str(out / f"{name}.estimate.json"), *config_args,
                        *(o for o in overrides if not o.startswith("run.out_dir="))]
        steps.append(Step(run, name, cmd, env, ranks, estimate=estimate, json=json_path, metrics_from=metrics_from,
                          skip=skip, condition=condition))
    return steps


def shown(cmd: List[str], env: Dict[str, str]) -> str:
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (pre + " " if pre else "") + shlex.join(cmd)


# ---------------------------------------------------------------- running

def capture(cmd, timeout=60, env=None) -> str:
    """A command's output, without DeepSpeed's log lines ("[2026-...] [WARNING] ...") and terminal colours."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        text = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr).strip()
        return "\n".join(ln for ln in text.splitlines() if not ln.startswith("[20"))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({cmd[0]}: {e})"


def git_head() -> str:
    """The checked-out commit, read from .git without running git (absent on the GPU machine)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return f"{(git / ref).read_text().strip()} ({ref})"
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return f"{line.split()[0]} ({ref})"
    except OSError:
        pass
    return "unknown (no .git)"


def csrc_hash() -> str:
    h = hashlib.sha256()
    for f in sorted((ROOT / "kernels" / "csrc").iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def gpu_count() -> Optional[int]:
    try:
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    n = sum(1 for ln in p.stdout.splitlines() if ln.startswith("GPU "))
    return n if p.returncode == 0 and n else None


def report_env(exp: dict, a, out: Path):
    py = sys.executable
    lines = [time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime()),
             f"experiment {exp['name']}{' (tiny check)' if a.tiny else ''}: {' '.join(sys.argv[1:])}",
             capture(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                      "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "no GPU"]
    if shutil.which("nvidia-smi"):
        lines += capture(["nvidia-smi", "topo", "-m"]).splitlines()[:12]
    lines.append(capture([py, "-c", "import sys, torch; print('python', sys.version.split()[0], 'torch', "
                                    "torch.__version__, 'cuda', torch.version.cuda)"]))
    lines.append(capture([py, "-c", "import deepspeed; print('deepspeed', deepspeed.__version__)"]))
    mem = [ln for ln in Path("/proc/meminfo").read_text().splitlines()[:2]] if Path("/proc/meminfo").exists() else []
    lines.append(f"cpus {os.cpu_count()}; " + "; ".join(" ".join(m.split()) for m in mem))
    lines.append(f"commit {git_head()}; kernels/csrc sha256 {csrc_hash()}")
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    ds_report = Path(py).parent / "ds_report"
    ds = [str(ds_report)] if ds_report.is_file() else ["ds_report"] if shutil.which("ds_report") else None
    if ds:
        (out / "ds_report.txt").write_text(capture(ds, timeout=120) + "\n")
    if exp["build_kernel"] and not a.tiny:   # the WKV kernel once per machine (about 25 s cold), timed apart
        code = ("import time, torch; from rrwkv.kernels import build\nt = time.time(); "
                "build.load_wkv_extension(torch.bfloat16); "
                "print(f'WKV kernel (bf16) build/load {time.time() - t:.1f} s')")
        line = (capture([py, "-c", code], timeout=600).splitlines() or ["WKV kernel: no output"])[-1]
        with open(out / "env.txt", "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def _stop(p: subprocess.Popen):
    """SIGTERM to the run's process group, SIGKILL KILL_AFTER s later (as `timeout --kill-after`)."""
    for sig, wait in ((signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def start(step: Step, log: Path, env: dict, echo: bool):
    """Starts the step; with echo its output is also printed as it comes (a thread copies it)."""
    full_env = {**env, **step.env}
    step.started = time.time()
    try:
        if not echo:
            with open(log, "w") as f:
                step.proc = subprocess.Popen(step.cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            return None
        step.proc = subprocess.Popen(step.cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace",
                                     bufsize=1)
    except OSError as e:                          # e.g. no ncu on this machine
        log.write_text(f"{step.cmd[0]}: {e}\n")
        print(f"{step.cmd[0]}: {e}", flush=True)
        step.proc, step.rc = None, 127
        return None

    def copy():
        with open(log, "w") as f:
            for line in step.proc.stdout:
                f.write(line)
                f.flush()
                print(line, end="", flush=True)
    t = threading.Thread(target=copy, daemon=True)
    t.start()
    return t


def finish(step: Step, timeout: float, copier=None):
    if step.proc is None:                         # it did not start
        return
    try:
        step.rc = step.proc.wait(max(timeout - (time.time() - step.started), 0.1))
    except subprocess.TimeoutExpired:
        _stop(step.proc)
        step.rc = 124                            # as `timeout` reports it
        step.extra["timeout"] = f"stopped after {timeout:g} s"
    if copier is not None:
        copier.join(15)
    step.seconds = time.time() - step.started


def ran_out_of_memory(step: Step, out: Path) -> bool:
    log = out / f"{step.name}.log"
    if log.is_file() and OOM.search(log.read_text(errors="replace")):
        return True
    return bool(step.json and step.json.is_file() and '"error": "out of memory' in step.json.read_text())


def after(step: Step, out: Path):
    """What the runbooks printed after each run: its exit, how far a stopped run got, its key lines."""
    print(f"== {step.name}: exit {step.rc} after {step.seconds:.0f} s ({step.ranks} rank{'s' * (step.ranks > 1)})"
          f"{'; ' + step.extra['timeout'] if 'timeout' in step.extra else ''}", flush=True)
    step.oom = step.rc != 0 and ran_out_of_memory(step, out)
    if step.metrics_from is not None and (step.metrics_from / "metrics.jsonl").is_file():
        shutil.copy(step.metrics_from / "metrics.jsonl", out / f"{step.name}.metrics.jsonl")
    if step.run["show"] != "summary":
        return
    text = (out / f"{step.name}.log").read_text(errors="replace").splitlines()
    if step.rc != 0:
        print("\n".join([ln for ln in text if ln.startswith("benchmark:")][-3:]))
    keep = [ln[:400] for ln in text if KEY_LINES.search(ln) and not ln.startswith("[")]
    if keep:
        print("\n".join(keep[-14:]), flush=True)


# ---------------------------------------------------------------- summary

def result_lines(step: Step, out: Path) -> List[str]:
    """One line per model of a launch/benchmark.py result, or the figures of a training run's metrics."""
    lines = []
    if step.json is not None and step.json.is_file():
        try:
            results = json.loads(step.json.read_text()).get("results")
        except (ValueError, AttributeError):
            results = None
        for model, r in (results or {}).items():
            if isinstance(r, dict) and "seconds" in r:
                s = r["seconds"]
                lines.append(f"  {model:26} {r['tokens_per_s']:9.0f} tok/s  MFU {r.get('mfu', 0):.3f}  "
                             f"fwd {s['forward']:.3f} bwd {s['backward']:.3f} opt {s['optimizer']:.3f}  "
                             f"mem {r['mem_gb']:.1f} GB, reserved {max(r.get('mem_reserved_gb_per_rank', [0])):.1f} GB, "
                             f"alloc retries {max(r.get('alloc_retries_per_rank', [0]))}")
                pl = r.get("pipeline")
                if isinstance(pl, dict) and "schedule_bubble" in pl:
                    idle = ", ".join(f"{x['idle_frac']:.1%}" for x in sorted(pl.get("per_rank", []),
                                                                             key=lambda x: x["stage"]))
                    lines.append(f"  {'':26} pipeline: {pl['stages']} stages, {pl['micro_batches']} micro-batches, "
                                 f"schedule bubble {pl['schedule_bubble']:.1%}; outside fwd/bwd by stage {idle}")
            elif isinstance(r, dict) and "error" in r:
                lines.append(f"  {model:26} {r['error']}")
    metrics = out / f"{step.name}.metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        mfu = [r["mfu"] for r in rows if "mfu" in r]
        loss = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and "event" not in r]
        skipped = max((r.get("skipped_steps", 0) for r in rows), default=0)
        if tps:
            lines.append(f"  training: median {statistics.median(tps):.0f} tok/s over {len(tps)} windows, "
                         f"MFU {statistics.median(mfu) if mfu else 0:.3f}"
                         + (f", loss step {loss[0][0]} {loss[0][1]:.4f} -> step {loss[-1][0]} {loss[-1][1]:.4f}"
                            if loss else "") + f", skipped steps {skipped}")
    return lines


def summarize(exp: dict, steps: List[Step], out: Path) -> List[str]:
    lines = [f"{exp['name']}: {len([s for s in steps if s.rc is not None])} run(s) -> {exp['doc']}"]
    for s in steps:
        if s.rc is None:
            status = f"skipped ({s.skip})"
        elif s.rc == 0:
            status = "ok"
        else:
            status = ("out of memory" if s.oom else s.extra.get("timeout", f"exit {s.rc}"))
        lines.append(f"{s.name:30} {s.ranks} rank{'s' * (s.ranks > 1)}  {status}"
                     + (f", {s.seconds:.0f} s" if s.rc is not None else ""))
        if s.rc is not None:
            lines += result_lines(s, out)
    return lines


def scaling(steps: List[Step], out: Path) -> Optional[dict]:
    res = {}
    for s in steps:
        if s.rc == 0 and s.json is not None and s.json.is_file():
            r = json.loads(s.json.read_text()).get("results", {}).get("rrwkv")
            if isinstance(r, dict) and "tokens_per_s" in r:
                res.setdefault(s.ranks, r)
    if not res:
        return None
    base = min(res)
    per_gpu = res[base]["tokens_per_s"] / base
    s = {"gpus": sorted(res), "base_gpus": base,
         "tokens_per_s": {n: r["tokens_per_s"] for n, r in sorted(res.items())},
         "scaling_efficiency": {n: r["tokens_per_s"] / (n * per_gpu) for n, r in sorted(res.items())},
         "mfu": {n: r.get("mfu") for n, r in sorted(res.items())},
         "mem_gb": {n: r.get("mem_gb") for n, r in sorted(res.items())}}
    (out / "scaling.json").write_text(json.dumps(s, indent=1))
    return s


# ---------------------------------------------------------------- main

def run_experiment(a) -> int:
    exp = load_experiment(experiment_path(a.experiment))
    out = Path(a.out or ROOT / "runs" / exp["name"]).resolve()
    scratch = Path(tempfile.gettempdir()) / f"rrwkv-run-{exp['name']}-{os.getpid()}"
    ctx = {"out": out, "scratch": scratch, "python": sys.executable, "dry_run": a.dry_run,
           "variants": [str(Path(v).resolve()) for v in (a.variant or [])],
           "baseline_csrc": str(Path(a.baseline_csrc).resolve()) if a.baseline_csrc else None,
           "gpus": a.gpus if a.gpus is not None else (None if a.tiny or a.dry_run else gpu_count())}
    for d in [*ctx["variants"], *([ctx["baseline_csrc"]] if a.baseline_csrc else [])]:
        if not a.dry_run and not Path(d).is_dir():
            raise ExperimentError(f"no folder {d} (--variant / --baseline-csrc take a copy of kernels/csrc)")
    steps = plan(exp, a, ctx)
    if a.timeout:
        for s in steps:
            s.run = {**s.run, "timeout": a.timeout}
    if a.dry_run:
        print(f"# {exp['name']}: {' '.join(exp['description'].split())}\n# results feed {exp['doc']}; "
              f"needs {exp['gpus']} GPU(s){'; tiny check on CPU' if a.tiny else ''}; output in {out}")
        for c in exp["setup"]:
            print(f"[setup] {shlex.join(expand_all(c, ctx))}")
        for s in steps:
            notes = [n for n in (s.skip, s.condition) if n]
            head = f"[{s.name}] {s.ranks} rank{'s' * (s.ranks > 1)}, timeout {s.run['timeout']:g} s" + \
                   (f"{', background' if s.run['background'] else ''}") + (f" ({'; '.join(notes)})" if notes else "")
            print(head)
            if s.run.get("memory"):
                print(f"  memory: {' '.join(s.run['memory'].split())}")
            if s.estimate:
                print(f"  estimate: {shlex.join(s.estimate)} > {out / (s.name + '.estimate.txt')}")
            print(f"  {shown(s.cmd, s.env)} > {out / (s.name + '.log')}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("RRWKV_CACHE_DIR", "/tmp/rrwkv-cache")
    env.setdefault("RRWKV_KERNEL_CACHE", "/tmp/rrwkv-kernels")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/rrwkv-inductor")      # compiled graphs, reused across runs
    env.setdefault("PYTHONUNBUFFERED", "1")
    report_env(exp, a, out)
    if exp["setup"]:
        with open(out / "setup.log", "w") as f:
            for c in exp["setup"]:
                cmd = expand_all(c, ctx)
                print(f"== setup: {shlex.join(cmd)}", flush=True)
                p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
                if p.returncode != 0:
                    print(f"== setup failed (exit {p.returncode}): see {out / 'setup.log'}")
                    return 1
    by_name = {s.name: s for s in steps}
    background: Dict[str, List[Step]] = {}
    for s in steps:
        fb = s.run.get("fallback_for")
        if s.skip is None and fb is not None and by_name[fb].skip is None:
            primary = by_name[fb]
            if primary.rc == 0:
                s.skip = f"{fb} fitted"
            elif not primary.oom:
                s.skip = f"{fb} failed otherwise"
        if s.skip is not None:
            continue
        for n in s.run["needs"]:
            for b in background.pop(n, []):
                finish(b, b.run["timeout"])
                print(f"== {b.name} (background): exit {b.rc} after {b.seconds:.0f} s", flush=True)
        if s.estimate:
            est = subprocess.run(s.estimate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            text = "\n".join(ln for ln in (est.stdout + est.stderr).splitlines()
                             if "WARNING" not in ln and not ln.startswith("["))
            (out / f"{s.name}.estimate.txt").write_text(text + "\n")
        log = out / f"{s.name}.log"
        print(f"== {s.name} ({time.strftime('%H:%M:%S', time.gmtime())} UTC, {s.ranks} rank{'s' * (s.ranks > 1)}, "
              f"at most {s.run['timeout']:g} s): {shlex.join(s.cmd)}", flush=True)
        if s.run["background"]:
            start(s, log, env, echo=False)
            background.setdefault(s.run["name"], []).append(s)
            continue
        copier = start(s, log, env, echo=s.run["show"] == "all")
        finish(s, s.run["timeout"], copier)
        after(s, out)
    for group in background.values():
        for b in group:
            finish(b, b.run["timeout"])
            print(f"== {b.name} (background): exit {b.rc} after {b.seconds:.0f} s", flush=True)
    lines = summarize(exp, steps, out)
    if exp["scaling"]:
        sc = scaling(steps, out)
        if sc:
            lines.append("scaling: " + ", ".join(f"{n} GPUs {e:.1%}" for n, e in sc["scaling_efficiency"].items())
                         + " (scaling.json)")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)           # training runs' checkpoints, cold kernel caches
    print("\n".join(["", *lines]), flush=True)
    failed = []
    for s in steps:
        if s.rc in (None, 0):
            continue
        rescued = [f for f in steps if f.run.get("fallback_for") == s.name and f.rc == 0] if s.oom else []
        if not rescued:
            failed.append(s.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def make_variant(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run.py make-variant",
                                description="A copy of kernels/csrc with other macro defaults, in DIR/kernels/csrc.")
    p.add_argument("dir")
    p.add_argument("defines", nargs="*", metavar="NAME=VALUE")
    p.add_argument("--rev", default=None, help="the sources of this git revision instead of the working tree's")
    a = p.parse_args(argv)
    for kv in a.defines:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv):
            print(f"make-variant: '{kv}' is not NAME=VALUE", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        csrc = Path(tmp) / "kernels" / "csrc"
        if a.rev:
            arch = subprocess.run(["git", "archive", a.rev, "kernels/csrc"], cwd=ROOT, capture_output=True)
            if arch.returncode != 0:
                print(f"make-variant: git archive {a.rev} failed: {arch.stderr.decode(errors='replace')}",
                      file=sys.stderr)
                return 1
            subprocess.run(["tar", "-x", "-C", tmp], input=arch.stdout, check=True)
        else:
            shutil.copytree(ROOT / "kernels" / "csrc", csrc)
        files = sorted(f for f in csrc.iterdir() if f.is_file())
        texts = {f: f.read_text() for f in files}
        for kv in a.defines:
            name, value = kv.split("=", 1)
            pat = re.compile(rf"^#define {name}( .*)?$", re.M)
            hits = sum(len(pat.findall(t)) for t in texts.values())
            if hits != 1:
                print(f"make-variant: #define {name} is on {hits} lines of kernels/csrc, not one", file=sys.stderr)
                return 1
            texts = {f: pat.sub(lambda m: f"#define {name} {value}", t) for f, t in texts.items()}
        for f, t in texts.items():
            if t != f.read_text():
                f.write_text(t)
        dest = Path(a.dir)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.move(str(Path(tmp) / "kernels"), str(dest / "kernels"))
    print(f"{a.dir}/kernels/csrc: {' '.join(a.defines) or '(no changes)'}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make-variant"]:
        return make_variant(argv[1:])
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Experiments: " + ", ".join(sorted(x.stem for x in EXPERIMENTS.glob("*.yaml")))
                                + ". Also: `benchmarks/run.py make-variant DIR NAME=VALUE ...` (see the module's doc).")
    p.add_argument("experiment", nargs="?", help="a name in benchmarks/experiments/ or a path to a YAML file")
    p.add_argument("--out", default=None, help="output folder (default runs/EXPERIMENT)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="these runs only (optional ones included)")
    p.add_argument("--skip", nargs="+", default=None, metavar="RUN", help="leave these runs out")
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config overrides for every config run (after the experiment's)")
    p.add_argument("--tiny", action="store_true", help="the CPU check: tiny model, gloo ranks, at most 2")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run, for every run")
    p.add_argument("--gpus", type=int, default=None, help="skip runs that need more GPUs (default: nvidia-smi's count)")
    p.add_argument("--variant", action="append", default=None, metavar="DIR",
                   help="kernel experiment: a variant of kernels/csrc to compare with (repeatable)")
    p.add_argument("--baseline-csrc", default=None, metavar="DIR",
                   help="kernel experiment: another version of kernels/csrc, timed in the same run")
    p.add_argument("--list", action="store_true", help="list the experiments")
    a = p.parse_args(argv)
    for key in ("only", "skip"):
        if getattr(a, key):
            setattr(a, key, [x for v in getattr(a, key) for x in v.split(",") if x])
    if a.set and any("=" not in s for s in a.set):
        p.error("--set takes KEY=VALUE overrides")
    try:
        if a.list:
            for f in sorted(EXPERIMENTS.glob("*.yaml")):
                exp = load_experiment(f)
                print(f"{f.stem:22} {exp['gpus']} GPU(s)  {len(exp['runs'])} runs  "
                      f"{' '.join(exp['description'].split())[:100]}")
            return 0
        if not a.experiment:
            p.error("name an experiment (--list lists them)")
        return run_experiment(a)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
