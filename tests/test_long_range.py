"""The long-range study's scripts (benchmarks/long_range): report.py on the real result files of the CPU
pilot (tests/data/long_range), bad input, and one tiny CPU run through run.sh end to end, reported."""
import importlib.util
import json
import lzma
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "benchmarks" / "long_range"
PILOT = ROOT / "tests" / "data" / "long_range"
BEGIN, END = "<!-- long_range:results:begin -->", "<!-- long_range:results:end -->"
PNG = b"\x89PNG\r\n\x1a\n"


def report(results, doc, plots=None):
    cmd = [sys.executable, str(SCRIPTS / "report.py"), "--results", str(results), "--doc", str(doc)]
    return subprocess.run(cmd + (["--plots", str(plots)] if plots else []), capture_output=True, text=True,
                          timeout=120)


def make_doc(path):
    path.write_text(f"# Study\n\nabove\n\n{BEGIN}\nold tables\n{END}\n\nbelow\n")
    return path


def one_error_line(p):
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and p.stderr.strip().endswith(errors[0]) and "Traceback" not in p.stderr, p.stderr
    return errors[0]


def test_report_on_pilot_results(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(PILOT, results)
    doc = make_doc(tmp_path / "long_range.md")
    p = report(results, doc)
    assert p.returncode == 0, p.stderr
    text = doc.read_text()
    assert text.startswith("# Study\n\nabove\n\n" + BEGIN) and text.endswith(END + "\n\nbelow\n")
    assert "old tables" not in text and "PILOT of the scripts, not the study" in text
    runs = {}
    for f in sorted(results.glob("*.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["name"], []).append(r)
    assert set(runs) == {"rwkv4", "rrwkv-s32", "rrwkv-s128"}
    # rows in interval order, each with its parameters
    body = text[text.index(BEGIN):]
    assert body.index("| RWKV-4 |") < body.index("| RRWKV s=32 |") < body.index("| RRWKV s=128 |")
    # two seeds: the mean, then each seed's value in seed order
    for name, rs in runs.items():
        rs.sort(key=lambda r: r["seed"])
        losses = [r["eval"]["loss"] for r in rs]
        want = f"{statistics.fmean(losses):.3f}"
        if len(rs) > 1:
            want += " (" + " / ".join(f"{v:.3f}" for v in losses) + ")"
        assert want in text, (name, want)
    assert "Difference from RWKV-4" in text and "d=4k" in text
    for png in ("loss_by_position.png", "accuracy_by_distance.png"):
        data = (results / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
        assert f"(results/{png})" in text


def test_report_refuses_bad_input(tmp_path):
    doc = make_doc(tmp_path / "doc.md")
    (tmp_path / "empty").mkdir()
    assert "no result files" in one_error_line(report(tmp_path / "empty", doc))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text('{"study": "something else"}')
    assert "not a result file" in one_error_line(report(bad, doc))
    mixed = tmp_path / "mixed"
    shutil.copytree(PILOT, mixed)
    f = sorted(mixed.glob("*.json"))[0]
    r = json.loads(f.read_text())
    r["pilot"] = False
    f.write_text(json.dumps(r))
    assert "mixes pilot results" in one_error_line(report(mixed, doc))
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# no markers\n")
    assert "markers" in one_error_line(report(PILOT, no_markers, plots=tmp_path / "plots"))
    assert doc.read_text().count("old tables") == 1          # nothing written on failure


def run_sh(args, env_extra, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPTS / "run.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_run_sh_refuses_bad_input(tmp_path):
    env = {"RUNS_DIR": str(tmp_path / "runs")}
    assert "no study config" in one_error_line(run_sh(["nosuch"], env))
    assert "no study config" in one_error_line(run_sh(["base"], env))
    assert "SEED must be" in one_error_line(run_sh(["rwkv4", "12x"], env))
    assert "DEVICE is auto or cpu" in one_error_line(run_sh(["rwkv4"], {**env, "DEVICE": "tpu"}))
    assert "SHARED_GPU must be a whole number" in one_error_line(run_sh(["rwkv4"], {**env, "SHARED_GPU": "two"}))
    assert "lacks train.jsonl.xz" in one_error_line(
        run_sh(["rwkv4"], {**env, "DEVICE": "cpu", "CORPUS": str(tmp_path / "none"), "RESULTS_DIR": str(tmp_path)}))


def tiny_corpus(folder: Path) -> Path:
    """The study corpus layout (corpus.py's output) from this repository's own text files, 512 tokens."""
    files = sorted(ROOT.glob("docs/*.md")) + sorted(ROOT.glob("pretrain/*.py")) + [ROOT / "README.md"]
    docs = [{"text": f.read_text(), "source": "repo", "path": f.name} for f in files]
    folder.mkdir()
    for name, part in (("train", docs[2:]), ("valid", docs[:2])):
        with lzma.open(folder / f"{name}.jsonl.xz", "wt") as out:
            out.writelines(json.dumps(d) + "\n" for d in part)
        with open(folder / f"{name}.jsonl", "w") as out:
            out.writelines(json.dumps(d) + "\n" for d in part)
    p = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", "train-tokenizer", "--input", str(folder / "train.jsonl"),
                        "--vocab-size", "512", "--output", str(folder / "tokenizer")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return folder


TINY = ["model.vocab_size=512", "model.n_layer=1", "model.n_embd=32", "model.ctx_len=64", "data.seq_len=64",
        "data.micro_batch_size=2", "train.global_batch_size=2", "train.log_every=2", "train.eval_every=3",
        "train.eval_batches=1", "optim.warmup_steps=2"]


def test_run_sh_tiny_cpu_then_report(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    results = tmp_path / "results"
    env = {"DEVICE": "cpu", "CORPUS": str(corpus), "STUDY_DATA": str(tmp_path / "data"),
           "RUNS_DIR": str(tmp_path / "runs"), "RESULTS_DIR": str(results), "STEPS": "6", "TASK_SAMPLES": "1",
           "PASSKEY_DISTANCES": "48,96", "RECALL_DISTANCES": "16,96", "BUCKETS": "0,64,256", "EVAL_MAX_DOCS": "2",
           "EVAL_BATCH": "2", "SHARED_GPU": "2"}
    p = run_sh(["rrwkv-s32", "7", *TINY], env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((results / "rrwkv-s32-seed7.json").read_text())
    assert (r["name"], r["seed"], r["pilot"]) == ("rrwkv-s32", 7, True)
    assert r["model_config"]["medium_interval"] == 32 and r["model_config"]["n_embd"] == 32
    t = r["train"]
    assert t["complete"] and t["steps_done"] == 6 and t["tokens"] == 6 * 2 * 64 and t["exit_status"] == 0
    assert t["tokens_per_s_median"] > 0 and len(t["curve"]) == 4 and t["val_curve"][-1][0] == 6
    assert {"data", "train", "export", "eval", "total"} <= set(r["wall_s"])
    assert r["shared_gpu"] == 2
    ev = r["eval"]
    assert ev["documents"] == 2 and [b["bucket"] for b in ev["loss_by_position"]][0] == "0-64"
    assert [row["distance"] for row in ev["tasks"]["passkey"]] == [48, 96]
    assert (results / "rrwkv-s32-seed7.log").read_text().count("done in") == 1
    # the data step is skipped once done; a run folder of other settings is not resumed
    assert len(list((tmp_path / "data").iterdir())) == 1
    assert "train.max_steps" in one_error_line(run_sh(["rrwkv-s32", "7", *TINY], {**env, "STEPS": "8"}))
    # report.py reads what run.sh wrote
    doc = make_doc(tmp_path / "doc.md")
    p = report(results, doc)
    assert p.returncode == 0, p.stderr
    text = doc.read_text()
    assert "| RRWKV s=32 | 32 |" in text
    # it shared the GPU: no tokens/s or wall times in the comparison, and a note that says why
    row = next(ln for ln in text.splitlines() if ln.startswith("| RRWKV s=32 | 32 |")).split(" | ")
    assert row[5] == "–" and row[7] == "–" and row[8] == "– |", row
    assert "ran on a GPU shared by 2 runs" in text


def load_corpus_module():
    spec = importlib.util.spec_from_file_location("study_corpus", SCRIPTS / "corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                 # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_corpus_split_and_html():
    c = load_corpus_module()
    docs = [c.Doc("x" * (1000 + 37 * i), "s", f"d{i}", digest=f"{i:04d}") for i in range(200)]
    train, valid = c.split(docs, every=20)
    assert len(valid) == 10 and len(train) == 190
    assert {d.path for d in train} | {d.path for d in valid} == {d.path for d in docs}
    ranks = sorted(int(d.path[1:]) // 20 for d in valid)
    assert ranks == list(range(10))                     # one per length block
    assert [d.path for d in c.split(docs, every=20)[1]] == [d.path for d in valid]   # deterministic
    page = ('<html><head><title>T</title><script>x=1</script></head><body><div class="navheader">Prev Next</div>'
            '<nav>menu</nav><main><h1>Title <a class="headerlink">#</a></h1><p>One  two\nthree.</p>'
            '<pre>a  b\n  c</pre><div class="header">Next: x</div></main><p>after</p></body></html>')
    assert c.html_text(page, keep=("tag", "main")) == "Title\n\nOne two three.\n\na  b\n  c\n"
    assert "after" in c.html_text(page) and "Prev" not in c.html_text(page) and "menu" not in c.html_text(page)

