"""The engine on a GPU (skipped without CUDA): fp16 with an injected inf, and resume on GPU."""
import json
import shutil
import subprocess

import pytest
import torch

from tests.runs import ROOT, env, losses, pretrain_cmd, run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
GPU = ["optim.fused_adam=false", "train.max_steps=6", "train.save_every=2", "train.keep_last=3"]


def test_fp16_injected_inf_is_skipped_and_counted(cache_dir, tmp_path):
    out = tmp_path / "fp16"
    e = dict(env(), RRWKV_FAULT_NONFINITE_STEPS="5")
    p = subprocess.run(pretrain_cmd(out, cache_dir, GPU + ["train.precision=fp16"]), cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [r["step"] for r in rows if r.get("event") == "skipped_step_bad"]
    assert bad == [5]                                   # the injected inf, and nothing else, is a bad step
    last = [r for r in rows if r["step"] == 6 and "lr" in r][0]
    assert last["skipped_steps"] == 1 and last["loss"] == last["loss"]
    applied = 6 - 1 - last["overflow_steps"]            # loss-scale backoffs are skipped too, and counted
    assert applied >= 1


def test_bf16_resume_on_gpu_matches(cache_dir, tmp_path):
    ref = tmp_path / "ref"
    p = run(pretrain_cmd(ref, cache_dir, GPU + ["train.precision=bf16"]))
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step2", out / "checkpoints" / "step2")
    (out / "checkpoints" / "latest").write_text("step2")
    p = run(pretrain_cmd(out, cache_dir, GPU + ["train.precision=bf16"]))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = losses(out), losses(ref)
    diffs = {s: abs(a[s] - b[s]) for s in a}
    print("GPU resume |loss difference| by step:", diffs)
    assert max(diffs.values()) < 1e-3
