"""OUT_DIR belongs to one run at a time, and a run never starts over where checkpoints exist: without a
readable `latest` it resumes from the newest complete checkpoint. Real tiny runs on CPU."""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.runs import ROOT, env, pretrain_cmd, run

SAVE = ["train.save_every=3", "train.keep_last=3"]


def one_error_line(p):
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return err[0]


def test_without_a_readable_latest_the_run_resumes_from_the_newest_complete_checkpoint(tmp_path, cache_dir):
    out = tmp_path / "out"
    assert run(pretrain_cmd(out, cache_dir, ["train.max_steps=6", *SAVE])).returncode == 0
    ckpt = out / "checkpoints"
    (ckpt / "latest").unlink()                                     # lost
    (ckpt / "step7").mkdir()                                       # and a torn save after it: no rrwkv.json
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=9", *SAVE]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "latest is missing; resuming from the newest complete checkpoint" in p.stdout + p.stderr
    assert f"resumed from {ckpt / 'step6'} at step 6" in p.stdout and "fresh start" not in p.stdout
    trained = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert trained == list(range(1, 10))                            # steps 1-6, then 7-9: nothing trained twice

    (ckpt / "latest").write_text("\x00garbage")                    # unreadable: the same
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=10", *SAVE]))
    assert p.returncode == 0 and f"resumed from {ckpt / 'step9'} at step 9" in p.stdout, p.stderr[-3000:]

    # A checkpoint DeepSpeed cannot load is named in one line; moved aside, the one before it is used.
    optim = sorted((ckpt / "step10").glob("*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])    # cut short
    line = one_error_line(run(pretrain_cmd(out, cache_dir, ["train.max_steps=11", *SAVE])))
    assert f"checkpoint {ckpt / 'step10'} could not be loaded" in line and "move that directory aside" in line
    (ckpt / "step10").rename(tmp_path / "step10.bad")
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=11", *SAVE]))
    assert p.returncode == 0 and f"resumed from {ckpt / 'step9'} at step 9" in p.stdout, p.stderr[-3000:]


def test_checkpoint_folders_without_a_complete_one_are_refused(tmp_path, cache_dir):
    out = tmp_path / "out"
    (out / "checkpoints" / "step3").mkdir(parents=True)
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=2"]))
    line = one_error_line(p)
    assert "holds step3 but no complete checkpoint" in line
    assert not (out / "metrics.jsonl").exists()


def test_a_live_run_owns_its_out_dir_and_a_killed_one_frees_it(tmp_path, cache_dir):
    out = tmp_path / "out"
    first = subprocess.Popen(pretrain_cmd(out, cache_dir, ["train.max_steps=100000"]), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended early"
        line = one_error_line(run(pretrain_cmd(out, cache_dir, ["train.max_steps=2"])))
        assert f"is in use by another run (pid {first.pid} on host" in line
    finally:
        os.killpg(first.pid, signal.SIGKILL)                       # kill -9: the OS drops its lock
        first.wait()
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=2"]))
    assert p.returncode == 0, p.stderr[-3000:]


def test_bad_out_dir_and_data_fail_before_start_up(tmp_path, cache_dir):
    afile = tmp_path / "afile"
    afile.write_text("")
    p = run(pretrain_cmd(afile / "out", cache_dir, ["train.max_steps=1"]))
    assert f"{afile} is a file, not a folder" in one_error_line(p)
    p = run(pretrain_cmd(tmp_path / "out", cache_dir, ["data.train=/nonexistent/shards"]))
    assert "data.train: data source /nonexistent/shards not found" in one_error_line(p)
    assert "process(es)" not in p.stdout                            # refused before the process group started
    assert not afile.with_name("out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_out_dir_fails_before_start_up(tmp_path, cache_dir):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    p = run(pretrain_cmd(ro / "out", cache_dir, ["train.max_steps=1"]))
    assert "is not writable" in one_error_line(p) and "process(es)" not in p.stdout


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_its_data(tmp_path, cache_dir):
    out = tmp_path / "out"
    spike = ["train.max_steps=14", "train.save_every=4", "train.spike_steps=2", "train.spike_history=10"]
    p = subprocess.run(pretrain_cmd(out, cache_dir, spike), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(env(), RRWKV_FAULT_SPIKE_WINDOWS="9,10"))   # two corrupt batches: loss x 1000
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 10 and events[0]["to_step"] == 8
    assert events[0]["skip_windows"] == [9, 10]
    assert "rolled back to step 8, skipping data windows [9, 10]" in p.stderr
    after = [r for r in rows[rows.index(events[0]) + 1:] if "loss" in r and "event" not in r]
    assert [r["step"] for r in after] == list(range(9, 15))           # steps 9-14 again, on windows 11-16
    assert all(r["loss"] < 10 for r in after) and after[-1]["rollbacks"] == 1   # finite, no spike left
    # The rollback is part of the run's state: a resume knows the skipped windows and the count.
    p = run(pretrain_cmd(out, cache_dir, spike[1:] + ["train.max_steps=15"]))
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 15 and last["rollbacks"] == 1
