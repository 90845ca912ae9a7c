"""rrwkv-launch (pretrain/cli/launch.py): a stop request sent to the command, to its process group or
to one rank reaches every rank; the command returns 75 only after `latest` names a complete
checkpoint, and the run resumes exactly. Two gloo ranks on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.runs import ROOT, SMALL, env, losses

STEPS = ["train.max_steps=20", "train.save_every=0"]


def launch_cmd(out, cache, extra=()):
    return [sys.executable, "-m", "rrwkv.pretrain.cli.launch", "--nproc-per-node", "2", "--",
            "--config", str(ROOT / "configs/tiny.yaml"), f"run.out_dir={out}", f"data.cache_dir={cache}",
            *SMALL, *STEPS, *extra]


def rows(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stop_midway(out, cache, how):
    """Start the run, signal it (`how`) once it has trained a new step, and wait for the command."""
    before = len(rows(out))
    proc = subprocess.Popen(launch_cmd(out, cache), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(rows(out)) < before + 1:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "rrwkv.pretrain.cli.train" in p.cmdline()]
    assert len(ranks) == 2
    if how == "command":
        proc.send_signal(signal.SIGTERM)
    elif how == "process group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:                                           # one rank alone
        ranks[1].send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, output[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), "a rank outlived the command"
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / tag / "rrwkv.json").is_file()        # complete before the command returned
    assert (out / "REQUEUE").exists()
    return int(tag[4:])


def test_a_stop_reaches_every_rank_however_it_is_sent_and_the_run_resumes_exactly(tmp_path, cache_dir):
    ref, out = tmp_path / "ref", tmp_path / "out"
    p = subprocess.run(launch_cmd(ref, cache_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = [stop_midway(out, cache_dir, how) for how in ("command", "process group", "one rank")]
    assert saved == sorted(saved) and saved[-1] < 20
    p = subprocess.run(launch_cmd(out, cache_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(out) == losses(ref)                                     # bit for bit, across three stops
    assert not (out / "REQUEUE").exists()


def test_bad_input_is_one_line_before_any_rank_starts(tmp_path, cache_dir):
    p = subprocess.run(launch_cmd(tmp_path / "out", cache_dir, ["train.max_step=3"]), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "train.max_steps" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "out").exists()
