"""launch/benchmark.py on CPU at a tiny size: both models timed in one run, the table and the JSON."""
import json
import sys

from tests.runs import ROOT, SMALL, run


def test_benchmark_times_rrwkv_and_an_equal_parameter_transformer(tmp_path):
    out = tmp_path / "bench.json"
    p = run([sys.executable, str(ROOT / "launch/benchmark.py"), "--steps", "2", "--warmup", "1", "--json", str(out),
             "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, "model.n_embd=128"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RRWKV / SDPA tokens/s" in p.stdout and "sdpa_transformer" in p.stdout
    res = json.loads(out.read_text())
    r, t = res["results"]["rrwkv"], res["results"]["sdpa_transformer"]
    assert abs(t["params"] / r["params"] - 1) < 0.05            # equal parameter counts (within 5%)
    for m in (r, t):
        assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1
        s = m["seconds"]
        assert s["step"] >= s["forward"] + s["backward"] + s["optimizer"] > 0
    assert res["setup"]["seq_len"] == 64 and res["setup"]["global_batch"] == 8
