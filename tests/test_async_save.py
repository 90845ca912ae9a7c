"""train.async_save: checkpoints copied to host memory and written by a background thread, committed (`latest`)
only once every rank's files are complete. Real tiny runs on CPU (gloo), against a synchronous reference."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from rrwkv.pretrain.checkpoint import host_copy
from tests.runs import ROOT, env, losses, pretrain_cmd, run

STEPS = ["train.max_steps=6", "train.save_every=2", "train.keep_last=3"]
ASYNC = ["train.async_save=true"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The same run with synchronous saves (today's behaviour)."""
    out = tmp_path_factory.mktemp("sync") / "out"
    p = run(pretrain_cmd(out, cache_dir, STEPS))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def tag_files(out, tag):
    """{file name: size} of a checkpoint tag, and its rrwkv.json."""
    d = out / "checkpoints" / tag
    return {f.name: f.stat().st_size for f in d.iterdir()}, json.loads((d / "rrwkv.json").read_text())


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_host_copy_is_a_snapshot_that_keeps_shared_storages_shared(tmp_path):
    flat = torch.arange(12.0)
    state = {"a": flat[:4], "b": flat[4:].view(2, 4), "p": torch.nn.Parameter(torch.ones(3)),
             "nested": [(1, "x"), {"lr": 0.1}], "same": None}
    state["same"] = state["nested"]                          # one object referenced twice
    snap = host_copy(state)
    flat.mul_(0)                                             # training goes on: the copy must not change
    state["p"].data.add_(1)
    assert snap["a"].tolist() == [0, 1, 2, 3] and snap["b"][1].tolist() == [8, 9, 10, 11]
    assert snap["p"].tolist() == [1, 1, 1] and isinstance(snap["p"], torch.nn.Parameter)
    assert snap["a"].untyped_storage().data_ptr() == snap["b"].untyped_storage().data_ptr()   # one copy of `flat`
    assert snap["same"] is snap["nested"] and snap["nested"] == [(1, "x"), {"lr": 0.1}]
    torch.save(state, tmp_path / "orig.pt")
    torch.save(snap, tmp_path / "snap.pt")
    assert (tmp_path / "orig.pt").stat().st_size == (tmp_path / "snap.pt").stat().st_size


def test_async_saves_give_the_synchronous_run_and_its_checkpoints(reference, cache_dir, tmp_path):
    out = tmp_path / "async"
    p = run(pretrain_cmd(out, cache_dir, STEPS + ASYNC))
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(out) == losses(reference)                               # bit for bit
    for tag in ("step2", "step4", "step6"):                                # the same files, sizes and metadata
        assert tag_files(out, tag) == tag_files(reference, tag), tag
    assert (out / "checkpoints" / "latest").read_text() == "step6"
    assert "checkpoint step4: copied to host memory in" in p.stdout and "written in the background" in p.stdout
    row = [r for r in rows(out) if r["step"] == 5][0]                       # step 4's save, in the next rows
    assert {"save_s", "save_block_s", "save_wait_s", "save_write_s", "checkpoint_gb"} <= set(row)
    assert 0 < row["save_block_s"] <= row["save_s"] and row["checkpoint_gb"] > 0
    assert "save_block_s" not in [r for r in rows(reference) if r["step"] == 5][0]   # off: rows as before
    # (Resuming from asynchronous checkpoints, bit for bit: the kill and SIGTERM tests below.)


def test_kill_during_a_background_write_resumes_from_the_previous_checkpoint(reference, cache_dir, tmp_path):
    out = tmp_path / "killed"
    e = dict(env(), RRWKV_FAULT_SAVE_DELAY_S="10")    # each save's files wait 10 s (steps: 1-4 s) for their commit
    proc = subprocess.Popen(pretrain_cmd(out, cache_dir, STEPS + ASYNC), cwd=ROOT, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt, metrics = out / "checkpoints", out / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            trained = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] \
                if metrics.exists() else []
            if (ckpt / "step4").is_dir() and 5 in trained:      # step 4 is being written while step 5 trained
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (ckpt / "latest").read_text() == "step2" and not (ckpt / "step4" / "rrwkv.json").exists()
    for f in (ckpt / "step4").glob("*optim*"):
        f.write_bytes(f.read_bytes()[:100])          # and a torn file in the uncommitted tag
    p = run(pretrain_cmd(out, cache_dir, STEPS + ASYNC))
    assert p.returncode == 0 and "at step 2" in p.stdout, p.stderr[-3000:]
    assert losses(out) == losses(reference)


def test_sigterm_with_a_save_in_flight_exits_75_after_latest_names_a_complete_checkpoint(cache_dir, tmp_path):
    out = tmp_path / "term"
    cmd = pretrain_cmd(out, cache_dir, STEPS + ASYNC)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), RRWKV_FAULT_SAVE_DELAY_S="12"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("checkpoint step2: copied to host memory"):     # step 2 being written (12 s): stop
            proc.send_signal(signal.SIGTERM)
            break
    text = "".join(seen) + proc.stdout.read()
    assert proc.wait() == 75, text[-3000:]
    assert "s for checkpoint step2 to be written before saving step3" in text, text[-3000:]  # one in flight
    assert text.index("saved checkpoint step3:") < text.index("stopped on signal after saving step 3")
    assert json.loads((out / "REQUEUE").read_text())["step"] == 3
    assert (out / "checkpoints" / "latest").read_text() == "step3"
    assert (out / "checkpoints" / "step3" / "rrwkv.json").is_file()
    assert not (out / "checkpoints" / "step4").exists()


def test_two_ranks_commit_together_and_the_checkpoint_resumes(reference, cache_dir, tmp_path):
    out = tmp_path / "ranks2"
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=4", "train.save_every=2", *ASYNC], ranks=2))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ref = losses(reference)
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4] and max(abs(got[s] - ref[s]) for s in got) < 1e-4
    for tag in ("step2", "step4"):                     # both ranks' optimizer partitions, then the commit
        names = set(tag_files(out, tag)[0])
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "rrwkv.json"} <= names, names
    # Rank 1's background files are real: step 2 resumed on one process (merged through DeepSpeed's
    # universal checkpoint) continues as the reference does.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step2", resumed / "checkpoints" / "step2")
    (resumed / "checkpoints" / "latest").write_text("step2")
    p = run(pretrain_cmd(resumed, cache_dir, ["train.max_steps=4", "train.save_every=2", *ASYNC]))
    assert p.returncode == 0 and "at step 2" in p.stdout, p.stderr[-3000:]
    got = losses(resumed)
    assert sorted(got) == [3, 4] and max(abs(got[s] - ref[s]) for s in got) < 1e-4


def test_a_loss_spike_waits_for_the_save_in_flight_and_rolls_back_to_it(cache_dir, tmp_path):
    out = tmp_path / "spike"
    spike = ["train.max_steps=10", "train.save_every=4", "train.spike_steps=2", "train.spike_history=10", *ASYNC]
    e = dict(env(), RRWKV_FAULT_SPIKE_WINDOWS="9,10", RRWKV_FAULT_SAVE_DELAY_S="6")  # step 8's save still being
    p = subprocess.run(pretrain_cmd(out, cache_dir, spike), cwd=ROOT, capture_output=True, text=True,  # written
                       timeout=600, env=e)                                          # when the spike is seen
    assert p.returncode == 0, p.stderr[-3000:]
    events = [r for r in rows(out) if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 10 and events[0]["to_step"] == 8, events
    after = [r for r in rows(out)[rows(out).index(events[0]) + 1:] if "loss" in r]
    assert [r["step"] for r in after] == [9, 10] and all(r["loss"] < 10 for r in after)


def test_a_background_write_that_fails_stops_the_run_in_one_line(reference, cache_dir, tmp_path):
    out = tmp_path / "full"

    def small_files():               # a file-size limit (Python ignores SIGXFSZ: writes fail with EFBIG)
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))   # the optimizer file is 4.5 MB

    p = subprocess.run(pretrain_cmd(out, cache_dir, STEPS + ASYNC), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600, preexec_fn=small_files)
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"checkpoint {out / 'checkpoints' / 'step2'} could not be written (" in err[0]   # (torch's zip writer
    assert "start the run again" in err[0]                                        # reports EFBIG as a RuntimeError)
    assert not (out / "checkpoints" / "latest").exists() and not (out / "checkpoints" / "step2" / "rrwkv.json").exists()
    assert max(losses(out)) < 6                       # it stopped at the next save (step 4), not at the end


def test_a_configured_deepspeed_checkpoint_writer_is_refused_in_one_line(cache_dir, tmp_path):
    p = run(pretrain_cmd(tmp_path / "out", cache_dir, ["train.max_steps=1", *ASYNC,
                                                       "parallel.deepspeed.checkpoint.writer.type=python",
                                                       "parallel.deepspeed.checkpoint.writer.data_parallel=replica"],
                         ))
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "train.async_save=true" in err[0] and "parallel.deepspeed.checkpoint.writer" in err[0]
