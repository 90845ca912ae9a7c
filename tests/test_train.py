"""launch/pretrain.py end to end on CPU: one process and two gloo ranks (DeepSpeed), exact resume
after SIGKILL, run files, and one-line errors for bad input."""
import glob
import json
import os
import signal
import subprocess
import time

import pytest

from tests.runs import ROOT, env, losses, pretrain_cmd, run


def shm_buffers(cmd):
    port = cmd[cmd.index("--master_port") + 1]
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_two_ranks_zero2_resume_after_sigkill_is_exact(tmp_path, cache_dir):
    steps = ["train.max_steps=6", "train.save_every=3"]
    ref = tmp_path / "ref"
    cmd = pretrain_cmd(ref, cache_dir, steps, ranks=2)
    p = run(cmd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not shm_buffers(cmd)        # DeepSpeed's CPU all-reduce files are gone with the processes
    ref_losses = losses(ref)
    assert sorted(ref_losses) == list(range(1, 7))
    assert ref_losses[6] < ref_losses[1]
    ckpt = ref / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step6"
    assert (ref / "config.yaml").is_file() and "manifest.json" in (ref / "config.yaml").read_text()
    meta = json.loads((ref / "runs.jsonl").read_text().splitlines()[0])
    assert meta["packages"]["deepspeed"] and "git_revision" in meta and meta["world_size"] == 2
    row = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(row)

    # The same run, killed with SIGKILL once its step-3 checkpoint is complete, then started again.
    out = tmp_path / "killed"
    cmd = pretrain_cmd(out, cache_dir, steps, ranks=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step3":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not shm_buffers(cmd)        # ... even when they are killed
    p = run(pretrain_cmd(out, cache_dir, steps, ranks=2))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 3" in p.stdout
    assert "step=1 " not in p.stdout and "step=4 " in p.stdout   # continued, did not retrain step 1
    assert losses(out) == ref_losses                               # bit for bit


def test_single_process_trains_and_resumes_exactly(tmp_path, cache_dir):
    ref, split = tmp_path / "ref", tmp_path / "split"
    p = run(pretrain_cmd(ref, cache_dir, ["train.max_steps=6", "train.eval_every=3", "train.eval_batches=2",
                                          "logging.wandb.mode=offline"]))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    assert list((ref / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    # The same run killed (SIGKILL) after its first checkpoint, then started again. Validation and
    # wandb in the reference run must not change the training losses.
    proc = subprocess.Popen(pretrain_cmd(split, cache_dir, ["train.max_steps=6", "train.save_every=3"]), cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = split / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (latest.exists() and latest.read_text().strip()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    p = run(pretrain_cmd(split, cache_dir, ["train.max_steps=6", "train.save_every=3"]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(split) == losses(ref)


@pytest.mark.parametrize("extra,message", [
    (["train.max_step=5"], "unknown config key 'train.max_step' in override 'train.max_step=5'; did you mean 'train.max_steps'?"),
    (["data.train=/nonexistent/shards"], "data.train: data source /nonexistent/shards not found"),
    (["model.vocab_size=1000", "data.train={train}", "data.valid=null"], "use a vocabulary of 2048 tokens but the model has only 1000; set model.vocab_size >= 2048"),
    (["train.precision=fp8"], "choose one of bf16, fp16, fp32"),
    (["parallel.deepspeed.train_micro_batch_size_per_gpu=4"],
     "config key 'parallel.deepspeed.train_micro_batch_size_per_gpu' is set by data.micro_batch_size: set that instead"),
])
def test_bad_input_gives_one_clear_line(tmp_path, cache_dir, extra, message):
    from rrwkv.data_tools.builtin import prepare_builtin_corpus
    train = prepare_builtin_corpus(cache_dir, vocab_size=2048).train
    p = run(pretrain_cmd(tmp_path / "out", cache_dir, [e.format(train=train) for e in extra]))
    assert p.returncode == 2
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and message in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_resume_none_refuses_to_overwrite_checkpoints(tmp_path, cache_dir):
    out = tmp_path / "out"
    assert run(pretrain_cmd(out, cache_dir, ["train.max_steps=1"])).returncode == 0
    before = (out / "checkpoints" / "latest").read_text()
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=2", "run.resume=none"]))
    assert p.returncode == 2 and "already holds checkpoints and run.resume=none" in p.stderr
    assert (out / "checkpoints" / "latest").read_text() == before


def test_a_truncated_shard_is_counted_in_the_metrics_and_training_goes_on(tmp_path, cache_dir):
    import shutil
    from rrwkv.data_tools.builtin import prepare_builtin_corpus
    src = prepare_builtin_corpus(cache_dir, vocab_size=2048).train.parent
    data = tmp_path / "shards"
    shutil.copytree(src, data)
    shard = sorted(data.glob("shard-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])     # cut mid-file
    out = tmp_path / "out"
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=3", f"data.train={data}", "data.valid=null"]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert shard.name in p.stderr                                            # warned by name
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["corrupt_shards"] >= 1


def test_deepspeed_overrides_reach_the_engine(tmp_path, cache_dir):
    # parallel.deepspeed.* is merged into the DeepSpeed config the engine is given (written to
    # deepspeed_config.json): here ZeRO-1 in bf16 with DeepSpeed's per-parameter gradient hooks
    # (bf16.immediate_grad_update) and a smaller reduce bucket; the run trains as usual.
    out = tmp_path / "out"
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=4", "train.precision=bf16", "parallel.zero_stage=1",
                                          "parallel.deepspeed.bf16.immediate_grad_update=true",
                                          "parallel.deepspeed.zero_optimization.reduce_bucket_size=1000000"]))
    assert p.returncode == 0, p.stderr[-3000:]
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000000 and ds["zero_optimization"]["stage"] == 1
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4] and got[4] < got[1]
