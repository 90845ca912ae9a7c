"""launch/evaluate.py: loss and loss by position (checked against a direct per-document computation
in the parallel mode), synthetic long-range tasks (checked with an oracle that copies), and the
loglikelihood functions the lm_eval adapter calls."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrwkv.pretrain import tasks
from rrwkv.pretrain.evaluation import bucket_edges, iter_documents
from rrwkv.pretrain.export import load_model, load_tokenizer
from rrwkv.pretrain.lm_eval_adapter import Scorer

from .test_generate import corpus, make_model_dir  # noqa: F401  (corpus: a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):  # noqa: F811
    return make_model_dir(tmp_path_factory.mktemp("model"), corpus.tokenizer, interval=8, seed=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus):  # noqa: F811
    """A held-out shard directory of 12 real documents of 20 to ~300 tokens."""
    from rrwkv.data_tools.shards import tokenize_files
    from rrwkv.data_tools.tokenizer import load_tokenizer as load
    tok = load(corpus.tokenizer)
    src = sorted(Path(json.__file__).parent.glob("*.py")) + sorted(Path(random.__file__).parent.glob("email/*.py"))
    texts, rng = [], random.Random(0)
    for p in src:
        lines = p.read_text().splitlines(keepends=True)
        start = rng.randrange(max(1, len(lines) - 80))
        text = "".join(lines[start:start + rng.choice([5, 20, 60])])
        if 20 <= len(tok.encode(text)) <= 320:
            texts.append(text)
        if len(texts) == 12:
            break
    d = tmp_path_factory.mktemp("heldout")
    with open(d / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tokenize_files([d / "docs.jsonl"], corpus.tokenizer, d / "shards", workers=1, progress=False)
    return d / "shards"


def evaluate(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_loss_by_position_matches_a_direct_computation(tmp_path, model_dir, shards):
    report = tmp_path / "r.json"
    p = evaluate("--model", model_dir, "--data", shards, "--report", report, "--buckets", "0,16,64,256,1024",
                 "--chunk-len", 24, "--batch-size", 5, "--no-tasks")     # chunks < ctx_len 32 < documents
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(report.read_text())
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    docs = list(iter_documents(shards))
    losses = []
    with torch.no_grad():     # each document alone, in one parallel call, from EOS
        for d in docs:
            seq = torch.tensor([[tok.eos_id, *d.tolist(), tok.eos_id]])
            losses.append(F.cross_entropy(model(seq[:, :-1])[0].float(), seq[0, 1:], reduction="none").double().numpy())
    total = sum(l.sum() for l in losses) / sum(len(l) for l in losses)
    assert r["tokens"] == sum(len(d) + 1 for d in docs) and r["documents"] == len(docs) == 12
    assert math.isclose(r["loss"], total, rel_tol=1e-5) and math.isclose(r["perplexity"], math.exp(total), rel_tol=1e-4)
    rows = {b["bucket"]: b for b in r["loss_by_position"]}
    expected = {}
    for lo, hi in [(0, 16), (16, 64), (64, 256), (256, 1024)]:
        spans = [l[lo:hi] for d, l in zip(docs, losses) if len(d) >= hi]
        if spans:
            expected[f"{lo}-{hi}"] = (sum(s.sum() for s in spans) / sum(len(s) for s in spans), len(spans))
    assert set(rows) == set(expected) and len(expected) >= 3    # 256-1k has no document long enough
    for name, (loss, n) in expected.items():
        assert rows[name]["documents"] == n and math.isclose(rows[name]["loss"], loss, rel_tol=1e-5), name
    assert "positions" in p.stdout and "report written" in p.stdout


def test_default_buckets():
    assert bucket_edges(100) == [0, 256]
    assert bucket_edges(5000) == [0, 256, 1024, 4096, 16384]


class CopyOracle(torch.nn.Module):
    """Predicts by induction: the token that followed the longest earlier match of the recent tokens.

    Solves passkey and associative recall exactly when their sequences are built right, so it
    checks the generators' answer positions and the scoring (batch size 1; state = the history).
    """

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.cfg = type("Cfg", (), {"ctx_len": 16})

    def forward(self, idx, state=None, return_state=False):
        hist = list(state or [])
        out = torch.full((1, idx.shape[1], self.vocab), -10.0)
        for t, tok in enumerate(idx[0].tolist()):
            hist.append(tok)
            best, nxt = 0, 0
            for j in range(len(hist) - 1):
                k = 0
                while k < 12 and j - k >= 0 and hist[j - k] == hist[len(hist) - 1 - k]:
                    k += 1
                if k >= best and k > 0:
                    best, nxt = k, hist[j + 1]
            out[0, t, nxt] = 10.0
        return (out, hist) if return_state else out


def test_synthetic_tasks(model_dir):
    tok = load_tokenizer(model_dir)
    pk = tasks.passkey_sequences(tok, [40, 100], samples=3, seed=1)
    assert [s.tokens for s in pk] == [s.tokens for s in tasks.passkey_sequences(tok, [40, 100], 3, seed=1)]
    assert [s.tokens for s in pk] != [s.tokens for s in tasks.passkey_sequences(tok, [40, 100], 3, seed=2)]
    for s in pk:
        (probe,) = s.probes
        answer = tok.decode(s.tokens[probe.start + 1:])
        assert answer.isdigit() and len(answer) == 5 and probe.distance == s.group
        assert tok.decode(s.tokens[:probe.start + 1]).endswith("The pass key is ")
        fact = tok.decode(s.tokens[:probe.start + 1 - probe.distance])
        assert fact.endswith(f"The pass key is {answer}. Remember it. {answer} is the pass key.\n")
    mq = tasks.recall_sequences(tok, [10, 50], samples=2, pairs=4, seed=1)
    for s in mq:
        assert len(s.probes) == 4
        for p in s.probes:
            key = s.tokens[p.start - 1 - (len(tok.encode(": ")) - 1)]
            pair_at = s.tokens.index(key)                   # keys are distinct: the pair's key
            assert s.tokens[pair_at + len(tok.encode(": ")) + 1] == p.answer[0]
            assert p.distance >= s.group
    oracle = CopyOracle(tok.vocab_size)
    for rows in (tasks.score_tasks(oracle, pk, chunk_len=16, batch_size=1),
                 tasks.score_tasks(oracle, mq, chunk_len=16, batch_size=1)):
        assert [r["accuracy"] for r in rows] == [1.0, 1.0] and all(r["answer_nll"] < 1e-3 for r in rows)
    # A small random model: accuracy and answer NLL as a direct parallel-mode computation gives them.
    model = load_model(model_dir)
    rows = tasks.score_tasks(model, mq, chunk_len=24, batch_size=3)
    for r, d in zip(rows, [10, 50]):
        hits, nll = [], []
        for s in (s for s in mq if s.group == d):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([s.tokens]))[0].float(), -1)
            for p in s.probes:
                hits.append(int(logp[p.start].argmax()) == p.answer[0])
                nll.append(-float(logp[p.start, p.answer[0]]))
        assert r["distance"] == d and r["questions"] == 8
        assert r["accuracy"] == np.mean(hits) and math.isclose(r["answer_nll"], np.mean(nll), rel_tol=1e-5)


def test_cli_reports_tasks_by_distance(tmp_path, model_dir, shards):
    report = tmp_path / "r.json"
    p = evaluate("--model", model_dir, "--data", shards, "--report", report, "--max-docs", 3,
                 "--passkey-distances", "40,80", "--recall-distances", "8,32", "--task-samples", 2, "--task-seed", 5)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["documents"] == 3 and {"loss", "perplexity", "loss_by_position"} <= set(r)
    assert [x["distance"] for x in r["tasks"]["passkey"]] == [40, 80]
    assert [x["distance"] for x in r["tasks"]["associative_recall"]] == [8, 32]
    assert all(0 <= x["accuracy"] <= 1 and x["questions"] > 0 for x in r["tasks"]["associative_recall"])


def test_lm_eval_loglikelihood_functions(model_dir):
    model, tok = load_model(model_dir, dtype=torch.float64), load_tokenizer(model_dir)
    scorer = Scorer(model, tok, chunk_len=8, batch_size=2)
    pairs = [("def add(a, b):\n    return", " a + b"), ("import", " os"), ("", "x = 1"),
             ("class Foo:\n", "    pass")]
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        n = len(ctx) - len(ctx.rstrip())
        c, x = [tok.eos_id] + tok.encode(ctx[:len(ctx) - n]), tok.encode(ctx[len(ctx) - n:] + cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([c + x]))[0], -1)
        rows = logp[len(c) - 1:len(c) - 1 + len(x)]
        assert math.isclose(ll, float(rows[torch.arange(len(x)), torch.tensor(x)].sum()), rel_tol=1e-9)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(x)).all())
    # generate_until: the greedy continuation, cut before the first stop string
    from rrwkv.pretrain.generation import Sampling, generate
    greedy = tok.decode(list(generate(model, [tok.eos_id] + tok.encode("def f(x):"), 12, Sampling(temperature=0),
                                      stop_ids=(tok.eos_id,))))
    stop = greedy[3:5] if len(greedy) >= 5 else "\n\n"
    text = scorer.generate_until("def f(x):", until=[stop], max_gen_toks=12)
    assert text == (greedy[:greedy.index(stop)] if stop in greedy else greedy)
    (rolling,) = scorer.loglikelihood_rolling(["print('hi')\n"])
    assert math.isclose(rolling, scorer.loglikelihood([("", "print('hi')\n")])[0][0], rel_tol=1e-9)


def test_errors_are_one_line(tmp_path, model_dir, shards):
    cases = [(["--model", tmp_path / "nope", "--data", shards], "expected model.safetensors and config.json"),
             (["--model", model_dir, "--data", tmp_path / "nodata"], "not found: expected a shard directory"),
             (["--model", model_dir, "--data", shards, "--buckets", "5,10"], "--buckets must start at 0")]
    for args, message in cases:
        p = evaluate(*args, "--report", tmp_path / "r.json")
        err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and message in err[0], p.stderr[-1500:]


def test_windows_reproduce_the_val_loss_training_logged(tmp_path, cache_dir):
    """Issue #20: training's val_loss and launch/evaluate.py measure different things (packed windows
    from a zero state vs whole documents with carried state: docs/training.md, Validation); given the
    windows training scored, evaluate.py gives its number to float precision, from the exported model."""
    from .runs import pretrain_cmd, run
    out, model = tmp_path / "run", tmp_path / "model"
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=3", "train.eval_every=3", "train.eval_batches=2"]))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    p = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(out), "--output",
                        str(model)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = tmp_path / "eval.json"
    p = evaluate("--model", model, "--data", "builtin", "--cache-dir", cache_dir, "--report", report, "--no-tasks",
                 "--max-docs", 20, "--windows", 2, "--window-batch", 4, "--window-len", 64)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["windows"]["batches"] == 2 and r["windows"]["tokens"] == 2 * 4 * 64
    assert abs(r["windows"]["loss"] - val) <= 1e-5 * val, (r["windows"]["loss"], val)
    assert abs(r["loss"] - val) > 1e-3          # the per-document loss is another measurement
    p = evaluate("--model", model, "--data", "builtin", "--cache-dir", cache_dir, "--report", report, "--no-tasks",
                 "--windows", 2)
    assert p.returncode == 2 and "--window-batch" in p.stderr and "Traceback" not in p.stderr
