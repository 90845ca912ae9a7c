"""The distributed engine on CPU (gloo): ZeRO 1/2/3, pipeline stages and compiled blocks agree with one process, exact
resume (pipeline, and a 2-rank checkpoint on 1 rank), kill during a save, SIGTERM, non-finite steps."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.runs import ROOT, env, losses, pretrain_cmd, run

STEPS = ["train.max_steps=6", "train.save_every=2", "train.keep_last=3"]
LAYOUTS = {  # name: (ranks, overrides); every one has the global batch of 8 rows
    "one_process_micro8": (1, ["data.micro_batch_size=8"]),
    "one_process_micro4x2_recompute": (1, ["data.micro_batch_size=4", "train.activation_checkpointing=true"]),
    "zero1_2ranks": (2, ["parallel.zero_stage=1"]),
    "zero2_2ranks_micro2x2": (2, ["parallel.zero_stage=2", "data.micro_batch_size=2"]),
    "zero3_2ranks_offload": (2, ["parallel.zero_stage=3", "parallel.offload=all"]),   # zero.Init (the default)
    "zero3_2ranks_no_zero_init": (2, ["parallel.zero_stage=3", "parallel.zero_init=false"]),
    "pipeline_2stages": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1"]),
    "pipeline_2stages_recompute": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1",
                                       "train.activation_checkpointing=true"]),
    "zero3_2ranks_compiled_recompute": (2, ["parallel.zero_stage=3", "model.compile=true",  # blocks as ZeRO-3
                                            "train.activation_checkpointing=true"]),          # leaf modules
    "pipeline_2stages_compiled": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "model.compile=true"]),
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, cache_dir):
    """Each layout trained for 6 steps (checkpoints at 2, 4, 6); out_dir per layout."""
    root = tmp_path_factory.mktemp("layouts")
    outs = {}
    for name, (ranks, extra) in LAYOUTS.items():
        out = root / name
        p = run(pretrain_cmd(out, cache_dir, STEPS + extra, ranks=ranks))
        assert p.returncode == 0, name + "\n" + p.stdout[-2000:] + p.stderr[-3000:]
        outs[name] = out
    return outs


def test_every_layout_logs_the_same_losses(layout_runs):
    ref = losses(layout_runs["one_process_micro8"])
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1]
    for name, out in layout_runs.items():
        got = losses(out)
        for step in (1, 2, 3):  # step 1 equal: same weights and data; steps 2-3: the same update
            assert abs(got[step] - ref[step]) < 1e-3, (name, step, got[step], ref[step])
        # A different micro-batch split of the same global batch: equal up to float rounding.
        assert max(abs(got[s] - ref[s]) for s in ref) < 1e-4, name


def resume_copy(src: Path, dst: Path, tag: str) -> None:
    """dst: a run directory holding src's checkpoint `tag` as its latest (as a crash after `tag` leaves it)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)


@pytest.mark.parametrize("name,ranks,extra,same_layout", [
    ("pipeline_2stages", 2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1"], True),
    ("zero2_2ranks_micro2x2", 1, ["parallel.zero_stage=2", "data.micro_batch_size=2"], False),  # 2 ranks -> 1
])
def test_resume_from_step2_is_exact(layout_runs, cache_dir, tmp_path, name, ranks, extra, same_layout):
    out = tmp_path / "resumed"
    resume_copy(layout_runs[name], out, "step2")
    p = run(pretrain_cmd(out, cache_dir, STEPS + extra, ranks=ranks))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "at step 2" in p.stdout
    got, ref = losses(out), losses(layout_runs[name])
    assert sorted(got) == [3, 4, 5, 6]
    if same_layout:
        assert got == {s: ref[s] for s in got}                 # same layout: bit for bit
    else:
        assert max(abs(got[s] - ref[s]) for s in got) < 1e-4   # other rank count: same batches, other sums


def test_kill_during_save_resumes_from_the_previous_checkpoint(layout_runs, cache_dir, tmp_path):
    out = tmp_path / "killed"
    e = dict(env(), RRWKV_FAULT_SAVE_DELAY_S="4")  # a window between writing step files and committing them
    proc = subprocess.Popen(pretrain_cmd(out, cache_dir, STEPS + ["data.micro_batch_size=8"]), cwd=ROOT, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckpt / "latest").exists() and (ckpt / "step4").is_dir() and not (ckpt / "step4" / "rrwkv.json").exists():
            time.sleep(0.5)   # step 4's files are being written, `latest` still says step2
            break
        time.sleep(0.1)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text().strip() == "step2"
    for f in (ckpt / "step4").glob("*optim*"):
        f.write_bytes(f.read_bytes()[:100])      # and a torn file in the uncommitted tag
    p = run(pretrain_cmd(out, cache_dir, STEPS + ["data.micro_batch_size=8"]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "at step 2" in p.stdout
    assert losses(out) == losses(layout_runs["one_process_micro8"])


def test_sigterm_saves_a_checkpoint_and_exits_for_requeue(layout_runs, cache_dir, tmp_path):
    out = tmp_path / "term"
    cmd = pretrain_cmd(out, cache_dir, STEPS + ["data.micro_batch_size=8"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step=1 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait() == 75, rest[-3000:]
    marker = json.loads((out / "REQUEUE").read_text())
    step = marker["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{step}" and step < 6
    p = run(cmd)                                   # the requeued job: continues and ends normally
    assert p.returncode == 0 and f"at step {step}" in p.stdout
    assert not (out / "REQUEUE").exists()
    assert losses(out) == losses(layout_runs["one_process_micro8"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_step_is_skipped_and_counted(cache_dir, tmp_path, precision):
    out = tmp_path / precision
    e = dict(env(), RRWKV_FAULT_NONFINITE_STEPS="2")
    p = subprocess.run(pretrain_cmd(out, cache_dir, ["train.max_steps=3", f"train.precision={precision}"]),
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "skipped_step_bad" and r["step"] == 2 for r in rows)
    last = [r for r in rows if r["step"] == 3 and "lr" in r][0]
    assert last["skipped_steps"] == 1 and last["loss"] == last["loss"] and abs(last["loss"]) < 20
    # The skipped step left the weights and the schedule alone: step 3 ran at step 2's lr.
    step2 = [r for r in rows if r["step"] == 2 and "lr" in r][0]
    assert last["lr"] == step2["lr"]


def test_too_many_nonfinite_steps_stop_the_run_keeping_the_checkpoint(cache_dir, tmp_path):
    out = tmp_path / "bad"
    e = dict(env(), RRWKV_FAULT_NONFINITE_STEPS="3,4")
    p = subprocess.run(pretrain_cmd(out, cache_dir, ["train.max_steps=6", "train.save_every=2",
                                                     "train.max_bad_steps=2"]),
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 3
    assert "2 non-finite steps in a row" in p.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step2"


def test_pipeline_with_zero2_is_refused(cache_dir, tmp_path):
    p = run(pretrain_cmd(tmp_path / "o", cache_dir, ["parallel.pipeline_stages=2", "parallel.zero_stage=2"], ranks=2))
    assert p.returncode != 0
    assert "parallel.pipeline_stages > 1 works with parallel.zero_stage 0 or 1, not 2" in p.stderr


def test_bf16_gradient_accumulation_in_a_pipeline(cache_dir, tmp_path):
    # train.grad_accum_dtype=bf16 (half the gradient memory of a ZeRO-1 pipeline stage) trains as fp32
    # accumulation does, within bf16 rounding; and it is refused for fp32 training, in one line.
    pipe = ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "train.precision=bf16", "train.max_steps=4",
            "data.micro_batch_size=2"]
    got = {}
    for dt in ("fp32", "bf16"):
        p = run(pretrain_cmd(tmp_path / dt, cache_dir, pipe + [f"train.grad_accum_dtype={dt}"], ranks=2))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        got[dt] = losses(tmp_path / dt)
    assert sorted(got["bf16"]) == [1, 2, 3, 4] and got["bf16"][4] < got["bf16"][1]
    assert max(abs(got["bf16"][s] - got["fp32"][s]) for s in got["fp32"]) < 0.05
    p = run(pretrain_cmd(tmp_path / "bad", cache_dir, ["train.grad_accum_dtype=bf16"]))
    assert p.returncode == 2 and "train.grad_accum_dtype" in p.stderr and "train.precision=bf16" in p.stderr
