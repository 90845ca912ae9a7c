"""Fault handling pieces in isolation, and fine-tuning from an exported model (run.init_from)."""
import json
import sys
import time

import pytest

from rrwkv.pretrain.faults import BadSteps, Watchdog
from tests.runs import ROOT, losses, pretrain_cmd, run


def test_bad_steps_counts_in_a_row_and_tells_fp16_overflow_apart():
    b = BadSteps(limit=2)
    assert b.update(7.0, skipped=False) == "" and b.in_a_row == 0
    assert b.update(float("nan"), skipped=False) == "bad"
    assert b.update(7.0, skipped=True) == "bad" and b.exceeded     # a skipped step in fp32/bf16 is bad
    assert b.update(7.0, skipped=False) == "" and not b.exceeded and b.total == 2
    f = BadSteps(limit=2, fp16=True)
    assert f.update(7.0, skipped=True) == "overflow"                 # the loss scaler backing off
    assert f.update(float("inf"), skipped=True) == "bad"
    assert (f.overflows, f.total, f.in_a_row) == (1, 1, 1)


def test_watchdog_reports_a_rank_that_stopped_making_progress(capfd):
    w = Watchdog(rank=3, timeout_s=0.4)
    w.beat(17)
    time.sleep(1.5)
    w.close()
    text = capfd.readouterr().err
    assert "rank 3 has made no progress" in text and "after step 17" in text
    assert "Thread" in text or "File" in text       # its stacks follow


@pytest.mark.parametrize("layout", [[], ["parallel.zero_stage=3"]])  # ZeRO-3: loaded into zero.Init partitions
def test_init_from_an_exported_model_starts_fresh_from_its_weights(tmp_path, cache_dir, layout):
    base, tuned, fresh = tmp_path / "base", tmp_path / "tuned", tmp_path / "fresh"
    assert run(pretrain_cmd(base, cache_dir, ["train.max_steps=6"])).returncode == 0
    model_dir = tmp_path / "model"
    p = run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(base), "--output", str(model_dir)])
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(pretrain_cmd(tuned, cache_dir, ["train.max_steps=2", f"run.init_from={model_dir}", *layout]))
    assert p.returncode == 0, p.stderr[-2000:]
    assert run(pretrain_cmd(fresh, cache_dir, ["train.max_steps=2"])).returncode == 0
    t, f, b = losses(tuned), losses(fresh), losses(base)
    assert sorted(t) == [1, 2]                       # a new run: step count, schedule and data from the start
    assert t[1] < f[1] - 0.3                         # but it starts from the trained weights
    assert abs(t[1] - b[1]) > 0.3                    # (not the base run's first step again)
    rows = [json.loads(l) for l in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == rows[0]["lr"] and rows[0]["step"] == 1
