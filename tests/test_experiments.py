"""benchmarks/run.py and benchmarks/experiments/*.yaml: every experiment file parses and --dry-run gives a
command for each of its runs; the driver's fallback, timeout and background handling on small commands;
and one experiment run for real with --tiny on CPU (gloo ranks, tiny model)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "benchmarks" / "run.py"
EXPERIMENTS = sorted((ROOT / "benchmarks" / "experiments").glob("*.yaml"))

_spec = importlib.util.spec_from_file_location("benchmarks_run", DRIVER)
drv = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_run"] = drv              # dataclasses look their module up there
_spec.loader.exec_module(drv)


def driver(*args, timeout=300):
    return subprocess.run([sys.executable, str(DRIVER), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_the_experiments_are_there():
    assert {p.stem for p in EXPERIMENTS} >= {"1b5_mfu", "1b5_vs_sdpa", "1b5_zero2_scaling", "7b", "14b",
                                             "engine_2gpu", "kernel"}
    assert not list((ROOT / "benchmarks").glob("gpu*.sh"))        # the runbooks the experiments replaced
    assert not (ROOT / "benchmarks" / "runbook.sh").exists()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_parses(path):
    exp = drv.load_experiment(path)
    assert exp["runs"] and exp["description"].strip()
    assert (ROOT / exp["doc"].split(",")[0].strip()).is_file(), exp["doc"]
    for c in exp["config"] + [c for r in exp["runs"] for c in r.get("config", [])]:
        assert (ROOT / c).is_file(), c
    for r in exp["runs"]:
        assert r["ranks"] <= exp["gpus"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("tiny", [False, True], ids=["gpu", "tiny"])
def test_dry_run_prints_a_command_for_every_run(path, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert drv.main([path.stem, "--dry-run", "--out", str(out), *(["--tiny"] if tiny else [])]) == 0
    text = capsys.readouterr().out
    assert not out.exists()                          # a dry run writes nothing
    lines = text.splitlines()
    for r in drv.load_experiment(path)["runs"]:
        name = r["name"] + ("_1" if r.get("foreach") else "")
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"[{name}]"))
        cmd = [ln for ln in lines[i + 1:i + 5]
               if ln.startswith("  ") and not ln.startswith(("  estimate:", "  memory:"))][0]
        if "cmd" not in r:
            assert r["script"] in cmd and "--config configs/tiny.yaml" in cmd
            assert ("--num_gpus" in cmd) == (r["launcher"] == "deepspeed")
            if r["script"] == "launch/benchmark.py":
                assert f"--json {out / r['name']}.json" in cmd
            ranks = min(r["ranks"], 2) if tiny else r["ranks"]
            if r["launcher"] == "deepspeed":
                assert f"--num_gpus {ranks} " in cmd
            assert "{" not in cmd, cmd                   # every placeholder filled in
            if tiny:
                assert "model.n_embd=64" in cmd and "data.seq_len=4096" not in cmd
        if r.get("estimate"):
            assert "memory_estimate.py" in lines[i + 1] + lines[i + 2]


def test_tiny_shrinks_sequence_and_ranks(capsys):
    assert drv.main(["7b", "--dry-run", "--tiny", "--only", "7b_pipe4"]) == 0
    text = capsys.readouterr().out
    cmd = [ln for ln in text.splitlines() if ln.startswith("  ") and "--json" in ln and "7b_pipe4.json" in ln][0]
    assert "--num_gpus 2 " in cmd and "parallel.pipeline_stages=2" in cmd and "data.seq_len=64" in cmd
    assert "[7b_zero3] " in text and "not in --only" in text


def test_bad_experiment_files_are_refused(tmp_path):
    base = "description: x\ngpus: 1\ndoc: README.md\n"
    cases = {"unknown top-level key": base + "colour: red\nruns: [{name: a}]\n",
             "unknown run key": base + "runs: [{name: a, colour: red}]\n",
             "fallback of nothing": base + "runs: [{name: a, fallback_for: b}]\n",
             "more ranks than gpus": base + "runs: [{name: a, ranks: 2}]\n",
             "unknown placeholder": base + "runs: [{name: a, cmd: ['{nope}']}]\n",
             "two runs of a name": base + "runs: [{name: a}, {name: a}]\n"}
    for what, text in cases.items():
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(drv.ExperimentError):
            drv.load_experiment(f)
        r = driver(f, "--dry-run")
        assert r.returncode == 2 and r.stderr.startswith("error:"), what


def test_fallback_timeout_and_background(tmp_path):
    """Small commands stand in for GPU runs: an out-of-memory run gets its fallback, a run that fits does
    not, a hung run is stopped at its timeout, a background run is waited for by the run that needs it."""
    py = "{python}"
    f = tmp_path / "demo.yaml"
    f.write_text(f"""
description: the driver's control flow
gpus: 1
doc: README.md
build_kernel: false
runs:
  - {{name: big, cmd: ["{py}", -c, "print('CUDA out of memory'); raise SystemExit(1)"]}}
  - {{name: big_recompute, fallback_for: big, cmd: ["{py}", -c, "print('fits')"]}}
  - {{name: small, cmd: ["{py}", -c, "print('fits')"]}}
  - {{name: small_recompute, fallback_for: small, cmd: ["{py}", -c, "print('not needed')"]}}
  - {{name: build, background: true, cmd: ["{py}", -c, "import time; time.sleep(1); open('{{out}}/built', 'w')"]}}
  - {{name: use, needs: [build], cmd: ["{py}", -c, "import os; assert os.path.exists('{{out}}/built')"]}}
  - {{name: hung, timeout: 2, cmd: ["{py}", -c, "import time; time.sleep(120)"]}}
""")
    out = tmp_path / "out"
    r = driver(f, "--out", out, "--gpus", "1", timeout=200)
    assert r.returncode == 1, r.stdout + r.stderr           # only the hung run failed
    summary = (out / "summary.txt").read_text()
    assert "big " in summary and "out of memory" in summary
    assert "big_recompute" in summary and "small_recompute" in summary and "skipped (small fitted)" in summary
    assert "hung" in summary and "stopped after 2 s" in summary
    assert (out / "big_recompute.log").read_text().strip() == "fits"
    assert not (out / "small_recompute.log").exists()
    assert "use" in summary and "failed: hung" in r.stdout
    assert [ln for ln in summary.splitlines() if ln.startswith("use ")][0].split()[3] == "ok,"
    assert (out / "env.txt").read_text().count("\n") >= 4


@pytest.mark.slow
def test_one_experiment_runs_on_cpu(tmp_path):
    """1.5B ZeRO-2 scaling's one-GPU run on the tiny check: env.txt, the estimate, the log, the benchmark's
    JSON, the summary and scaling.json (on CPU the figures mean nothing; the code paths are checked)."""
    out = tmp_path / "out"
    r = driver("1b5_zero2_scaling", "--tiny", "--only", "1b5_zero2_1gpu", "--out", out, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("env.txt", "1b5_zero2_1gpu.log", "1b5_zero2_1gpu.json", "1b5_zero2_1gpu.estimate.json",
                 "summary.txt", "scaling.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "1b5_zero2_1gpu.json").read_text())
    assert res["setup"]["seq_len"] == 64 and res["setup"]["zero_stage"] == 2
    assert res["results"]["rrwkv"]["tokens_per_s"] > 0
    est = json.loads((out / "1b5_zero2_1gpu.estimate.json").read_text())
    assert est["seq_len"] == 64 and est["zero_stage"] == 2
    assert json.loads((out / "scaling.json").read_text())["gpus"] == [1]
    summary = (out / "summary.txt").read_text()
    assert "1b5_zero2_1gpu" in summary and "tok/s" in summary and "skipped (not in --only)" in summary
