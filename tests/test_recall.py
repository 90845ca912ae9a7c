"""The recall suite (issue #19): task generators, models' state and chunked evaluation, the trainer
through its CLI, and resumable sweeps. All on CPU with real components."""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from rrwkv.pretrain.cli.recall import main
from rrwkv.pretrain.recall.models import answer_logits, build_model, state_size
from rrwkv.pretrain.recall.sweep import expand, load_grid, summarize
from rrwkv.pretrain.recall.tasks import IGNORE, gap_batch, gap_vocab, mqar_batch
from rrwkv.pretrain.recall.trainer import RecallConfig, train

V = 8192


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_mqar_structure_and_seeding():
    B, T, K = 64, 64, 4
    b = mqar_batch(B, T, K, gen(0))
    keys, values = b.inputs[:, 0:2 * K:2], b.inputs[:, 1:2 * K:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(r.tolist())) == K for r in keys) and all(len(set(r.tolist())) == K for r in values)
    assert ((b.positions >= 2 * K) & ((b.positions - 2 * K) % 2 == 0)).all()
    assert ((b.labels != IGNORE).sum(1) == K).all()
    for i in range(B):
        pairs = dict(zip(keys[i].tolist(), values[i].tolist()))
        for p in torch.nonzero(b.labels[i] != IGNORE).flatten().tolist():
            assert b.labels[i, p].item() == pairs[b.inputs[i, p].item()]   # the value paired with this key
    again, other = mqar_batch(B, T, K, gen(0)), mqar_batch(B, T, K, gen(1))
    assert torch.equal(again.inputs, b.inputs) and torch.equal(again.labels, b.labels)
    assert not torch.equal(other.inputs, b.inputs)
    # Zoology's power law (a = 0.01): the first query slot is far more likely than the last.
    slots = (mqar_batch(4096, T, K, gen(2)).positions - 2 * K) // 2
    counts = torch.bincount(slots.flatten(), minlength=(T - 2 * K) // 2)
    assert counts[0] > 3 * counts[-1] and counts[:5].sum() > counts[-5:].sum()


def test_gap_structure():
    K, G = 5, 37
    (k_lo, k_hi), (v_lo, v_hi), (n_lo, n_hi) = gap_vocab(V)
    b = gap_batch(32, K, gen(0), gap=G)
    assert b.inputs.shape == (32, 3 * K + G)
    keys, values = b.inputs[:, 0:2 * K:2], b.inputs[:, 1:2 * K:2]
    noise = b.inputs[:, 2 * K:2 * K + G]
    assert ((noise >= n_lo) & (noise < n_hi)).all()                       # exactly G noise tokens
    assert ((keys >= k_lo) & (keys < k_hi)).all() and ((values >= v_lo) & (values < v_hi)).all()
    assert n_lo >= v_hi and v_lo >= k_hi                                   # disjoint vocabularies
    assert torch.equal(b.positions, torch.arange(2 * K + G, 3 * K + G).expand(32, -1))
    for i in range(32):
        pairs = dict(zip(keys[i].tolist(), values[i].tolist()))
        queries = b.inputs[i, 2 * K + G:].tolist()
        assert sorted(queries) == sorted(pairs) and [pairs[q] for q in queries] == b.answers[i].tolist()
    t = gap_batch(64, K, gen(1), seq_len=100)                               # training windows
    assert t.inputs.shape == (64, 100) and ((t.gap >= 0) & (t.gap <= 100 - 3 * K)).all()
    for i in range(64):
        g, row = t.gap[i].item(), t.inputs[i]
        start = 100 - 3 * K - g
        assert (row[:start] >= n_lo).all() and (row[start + 2 * K:100 - K] >= n_lo).all()   # prefix, then exactly g
        assert (row[start:start + 2 * K] < n_lo).all() and (row[100 - K:] < k_hi).all()
        assert (row >= n_lo).sum().item() == 100 - 3 * K


def test_state_size_and_parameter_match():
    C, T = 32, 64
    rwkv4, rrwkv = build_model("rwkv4", 256, C, 2, T), build_model("rrwkv", 256, C, 2, T, interval=8)
    att = build_model("attention", 256, C, 2, T)
    assert state_size(rwkv4, T) == 5 * C and state_size(rrwkv, T) == 11 * C and state_size(att, T) == 2 * C * T
    assert att.n_head == 2
    body = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks."))  # noqa: E731
    assert abs(body(att) - body(rwkv4)) / body(rwkv4) < 0.02


@pytest.mark.parametrize("model,interval", [("rrwkv", 4), ("rwkv4", 0)])
def test_gap_eval_in_chunks_matches_one_pass(one_thread, model, interval):
    """A trained tiny model's answers at a gap beyond its training length, run in chunks of that length
    with carried state, equal one pass over the whole sequence (float64)."""
    cfg = RecallConfig(task="gap", seq_len=16, kv_pairs=2, model=model, interval=interval, d_model=16,
                       layers=2, steps=4, batch_size=4, eval_every=2, eval_samples=4, gaps=[5, 30], vocab_size=64,
                       device="cpu", lr=1e-2)
    report, m = train(cfg, log=lambda s: None)
    assert set(report["accuracy_by_gap"]) == {"5", "30"} and report["steps"] == 4
    m = m.double().eval()
    b = gap_batch(3, 2, gen(5), gap=30, vocab_size=64)         # 36 tokens: chunks 16 + 16 + 4
    with torch.no_grad():
        chunked = answer_logits(m, b.inputs, b.positions, chunk=16)
        whole = answer_logits(m, b.inputs, b.positions)
    assert chunked.shape == (3, 2, 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=1e-9)


def test_attention_gap_report_is_null_beyond_its_positions(one_thread):
    cfg = RecallConfig(task="gap", seq_len=16, kv_pairs=2, model="attention", d_model=16, layers=1, steps=2,
                       batch_size=4, eval_samples=4, gaps=[4, 10, 40], vocab_size=64, device="cpu")
    report, _ = train(cfg, log=lambda s: None)
    assert report["accuracy_by_gap"]["40"] is None and report["accuracy_by_gap"]["4"] is not None
    assert report["accuracy_by_gap"]["10"] is not None and report["state_size"] == 2 * 16 * 16


def test_grid_expansion_and_run_names():
    grid = {"base": {"task": "mqar", "steps": 10},
            "axes": {"cell": [{"seq_len": 64, "kv_pairs": 4}, {"seq_len": 128, "kv_pairs": 8}],
                     "model": [{"model": "attention", "lr": 1e-3}, {"model": "rrwkv", "interval": 8}],
                     "seed": [0, 1]}}
    runs = expand(grid, {"device": "cpu"})
    assert len(runs) == 8 and len({n for n, _ in runs}) == 8
    name, cfg = runs[2]
    assert name == "mqar-L64-K4-rrwkv-s8-d64x2-lr0.001-seed0" and cfg.device == "cpu" and cfg.steps == 10
    for path in sorted(Path(__file__).parents[1].glob("configs/recall/*.yaml")):   # the shipped grids expand
        assert expand(load_grid(path))
    assert len(expand(load_grid(Path(__file__).parents[1] / "configs/recall/mqar_lr.yaml"))) == 60


def test_sweep_resumes_only_missing_runs(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {task: mqar, seq_len: 16, kv_pairs: 2, d_model: 16, layers: 1, steps: 2, batch_size: 2,\n"
                    "       eval_samples: 4, vocab_size: 64, device: cpu, model: rwkv4}\n"
                    "axes:\n  lr: [1.0e-3, 2.0e-3]\n")
    out = tmp_path / "out"
    assert main(["--sweep", str(grid), "--out", str(out), "--concurrent", "2"]) == 0
    first = capsys.readouterr().out
    reports = sorted(out.glob("*.json"))
    assert [p.name for p in reports] == ["mqar-L16-K2-V64-rwkv4-d16x1-lr0.001-seed0.json",
                                         "mqar-L16-K2-V64-rwkv4-d16x1-lr0.002-seed0.json"]
    assert first.count("accuracy") == 2
    kept, mtime = reports[0], reports[0].stat().st_mtime_ns
    reports[1].unlink()
    assert main(["--sweep", str(grid), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert "1 already done, 1 to run" in second and "lr0.002" in second and "lr0.001-seed0:" not in second
    assert kept.stat().st_mtime_ns == mtime and reports[1].exists()
    assert main(["--summary", str(out)]) == 0
    table = capsys.readouterr().out
    assert "best lr per model and cell" in table and table.count("rwkv4") == 3


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["--task", "mqar", "--seq-len", "10", "--kv-pairs", "4", "--report", "x.json"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--model", "rrwkv", "--report", "x.json"]) == 2


# The CI check of the whole path: the attention control learns MQAR on CPU within a minute, far above
# chance. Issue #19 asks for >= 0.9 here. It is not reached: on this 2-core CPU a step of 64 sequences
# takes about 0.2 s, and the H100 scout (docs/recall.md) shows the control needs 1,200-2,700 steps to
# pass 0.9 at this cell (it first sits at 1/K = 0.25, knowing which values the sequence holds but not
# which key holds which). The CPU bar checks that the trainer learns; the GPU test below checks 0.97.
CI_RUN = ["--task", "mqar", "--seq-len", "64", "--kv-pairs", "4", "--model", "attention", "--d-model", "64",
          "--layers", "2", "--seed", "0"]
CI_SETTINGS = ["--device", "cpu", "--vocab-size", "256", "--steps", "250", "--lr", "1e-3", "--batch-size", "64",
               "--warmup", "20", "--weight-decay", "0", "--eval-every", "50", "--eval-samples", "256"]


def test_attention_learns_mqar_within_a_minute(tmp_path, one_thread):
    report_path = tmp_path / "run.json"
    t0 = time.perf_counter()
    assert main([*CI_RUN, *CI_SETTINGS, "--report", str(report_path)]) == 0
    wall = time.perf_counter() - t0
    report = json.loads(report_path.read_text())
    assert report["accuracy"] >= 0.15, report["curve"]           # chance: 1 / 128 (the value half)
    assert report["curve"][-1]["loss"] < report["curve"][0]["loss"] - 0.5, report["curve"]
    assert wall < 90, wall
    for key in ("loss", "steps", "tokens_per_s", "state_size", "params", "config", "curve"):
        assert key in report
    assert report["config"]["model"] == "attention" and report["state_size"] == 2 * 64 * 64
    assert report["config"]["tie_embeddings"] and not report["config"]["random_non_queries"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_control_reaches_097_on_the_gpu(tmp_path):
    """The check that the trainer works (issue #19): the attention control passes 0.97 on MQAR (64, 4),
    vocabulary 8192, at Zoology's batch (H100 scout: 0.97 at step 3,100, in about 80 s)."""
    report_path = tmp_path / "run.json"
    assert main([*CI_RUN, "--device", "cuda", "--heads", "1", "--batch-size", "512", "--lr", "1e-3",
                 "--warmup", "50", "--steps", "6000", "--eval-every", "100", "--eval-samples", "512",
                 "--target", "0.97", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["accuracy"] >= 0.97, report["curve"]
