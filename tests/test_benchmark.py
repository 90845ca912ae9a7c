"""launch/benchmark.py on CPU at a tiny size: both models timed in one run, the table and the JSON; the
pipeline bubble of a 2-stage layout."""
import json
import sys

from tests.runs import ROOT, SMALL, free_port, run


def test_benchmark_times_rrwkv_and_an_equal_parameter_transformer(tmp_path):
    out = tmp_path / "bench.json"
    p = run([sys.executable, str(ROOT / "launch/benchmark.py"), "--steps", "2", "--warmup", "1", "--profile",
             "--json", str(out),
             "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, "model.n_embd=128"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RRWKV / SDPA tokens/s" in p.stdout and "sdpa_transformer" in p.stdout
    res = json.loads(out.read_text())
    r, t = res["results"]["rrwkv"], res["results"]["sdpa_transformer"]
    assert abs(t["params"] / r["params"] - 1) < 0.05            # equal parameter counts (within 5%)
    for m in (r, t):
        assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and m["warmup_s"] > 0 and m["dynamo_graphs"] == 0
        s = m["seconds"]                                        # means of the synchronized phase steps
        assert s["step"] >= s["forward"] + s["backward"] + s["optimizer"] > 0
    assert res["setup"]["seq_len"] == 64 and res["setup"]["global_batch"] == 8
    # what the engine handles per step: RRWKV's many small tensors and its learning-rate groups (x1;
    # time_decay and medium_decay x2; time_first x3; no weight decay here) against the transformer's one
    assert r["param_groups"] == 3 and t["param_groups"] == 1
    assert r["param_tensors"] > t["param_tensors"] > 0
    assert "alloc_retries_per_rank" not in r                    # a GPU-only figure
    # --profile: one more step of each model under torch.profiler, printed and kept
    for m, name in ((r, "rrwkv"), (t, "sdpa_transformer")):
        assert m["profile"][0].startswith("  wall ") and "top host-side calls" in m["profile"][1]
        assert any("aten::mm" in ln for ln in m["profile"]), m["profile"]
        assert f"profile of one {name} step (rank 0):" in p.stdout


def test_benchmark_reports_the_pipeline_bubble(tmp_path):
    out = tmp_path / "pipe.json"
    p = run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch/benchmark.py"),
             "--steps", "2", "--warmup", "1", "--phase-steps", "1", "--json", str(out),
             "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, "parallel.pipeline_stages=2",
             "parallel.zero_stage=1", "data.micro_batch_size=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["results"]
    assert "sdpa_transformer" not in r                          # no transformer pipeline to compare with
    pl = r["rrwkv"]["pipeline"]
    assert pl["stages"] == 2 and pl["micro_batches"] == 4 and abs(pl["schedule_bubble"] - 1 / 5) < 1e-12
    assert sorted(s["stage"] for s in pl["per_rank"]) == [0, 1]
    for s in pl["per_rank"]:                                    # each stage's compute, and the rest of its step
        assert s["forward_s"] > 0 and s["backward_s"] > 0 and 0 <= s["idle_frac"] < 1
    assert len(r["rrwkv"]["mem_gb_per_rank"]) == 2
    assert "pipeline: 2 stages, 4 micro-batches per step; schedule bubble 20.0%" in p.stdout
