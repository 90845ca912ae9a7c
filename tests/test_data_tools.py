"""data_tools on real text: sentencepiece round trip, shards + manifest, determinism, bad input."""
import gzip
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from rrwkv.data_tools.cli import main as cli
from rrwkv.data_tools.builtin import prepare_builtin_corpus
from rrwkv.data_tools.manifest import load_manifest
from rrwkv.data_tools.shards import tokenize_files
from rrwkv.data_tools.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_FILES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py",
                "glob.py", "heapq.py", "keyword.py", "this.py", "stringprep.py"]

VARIED = [
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🚀🧪 and math ∑∫√.",
    "\tTabbed\tcolumns\there\n\t\tnested tab\n",
    "Windows line endings\r\nsecond line\r\n\r\nthird\r\n",
    "   leading spaces and trailing spaces   ",
    "  \n\n   multiple   inner    spaces\n \n",
    "literal space marks ▁ ▁▁ x▁y, NBSP\u00a0here, zero width\u200bjoiner",
    "\x00\x01 control bytes \x7f and a lone CR\r end",
    " ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
]


def _stdlib_texts():
    return [(STDLIB / n).read_bytes().decode("utf-8") for n in STDLIB_FILES]


def _run_cli(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "rrwkv.data_tools", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Input files of every kind: .txt documents, .jsonl, .jsonl.gz, .jsonl.zst."""
    d = tmp_path_factory.mktemp("corpus")
    texts = _stdlib_texts()
    for i, t in enumerate(texts[:5]):
        (d / f"doc{i}.txt").write_bytes(t.encode("utf-8"))
    for i, t in enumerate(VARIED):
        (d / f"varied{i}.txt").write_bytes(t.encode("utf-8"))
    lines = [json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[5:] + VARIED)]
    (d / "docs.jsonl").write_text("".join(lines), encoding="utf-8")
    (d / "docs2.jsonl.gz").write_bytes(gzip.compress("".join(lines[:4]).encode()))
    (d / "docs3.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(lines[4:]).encode()))
    return d


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "sp"
    assert cli(["train-tokenizer", "--input", str(corpus), "--vocab-size", "600",
                "--output", str(out)]) == 0
    return out.with_name("sp.model")


def _all_docs_of(corpus):
    """Expected documents in tokenize order: sorted files, records in line order."""
    docs = []
    for f in sorted(corpus.iterdir()):
        if f.suffix == ".txt":
            docs.append(f.read_bytes().decode("utf-8"))
        else:
            raw = f.read_bytes()
            if f.name.endswith(".gz"):
                raw = gzip.decompress(raw)
            elif f.name.endswith(".zst"):
                raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
            docs += [json.loads(l)["text"] for l in raw.decode().splitlines()]
    return docs


def _read_shard_docs(path):
    """Documents of a shard read with plain tarfile + np.load (independent of data_tools)."""
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.name.endswith(".npy") and m.name.count(".") == 1 and m.mtime == 0
            out.append(np.load(io.BytesIO(tf.extractfile(m).read())))
    return out


def test_round_trip_exact(tokenizer):
    tok = load_tokenizer(tokenizer)
    assert tok.eos_id == 2 and tok.vocab_size == 600
    for text in VARIED + _stdlib_texts():
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text
    settings = json.loads(tokenizer.with_suffix(".json").read_text())
    assert settings["settings"]["normalization_rule_name"] == "identity"
    assert settings["settings"]["add_dummy_prefix"] is False


def test_tokenize_manifest_and_round_trip(corpus, tokenizer, tmp_path):
    out = tmp_path / "shards"
    assert cli(["tokenize", "--input", str(corpus), "--tokenizer", str(tokenizer),
                "--output", str(out), "--workers", "1", "--shard-tokens", "3000"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert set(m) >= {"format", "tokenizer", "dtype", "shards", "total_docs", "total_tokens"}
    assert set(m["tokenizer"]) >= {"path", "sha256", "vocab_size", "eos_id"}
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 600
    assert len(m["shards"]) > 1
    expected = [d for d in _all_docs_of(corpus) if d]
    tok = load_tokenizer(out / m["tokenizer"]["path"])
    got = []
    for s in m["shards"]:
        docs = _read_shard_docs(out / s["file"])
        assert s["docs"] == len(docs) and s["tokens"] == sum(d.size for d in docs)
        assert all(d.dtype == np.uint16 and d.ndim == 1 for d in docs)
        got += docs
    assert m["total_docs"] == len(expected) == len(got)
    assert m["total_tokens"] == sum(d.size for d in got)
    assert [tok.decode(d.tolist()) for d in got] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["file"] for s in m["shards"]] + ["manifest.json", "tokenizer.model"])
    assert load_manifest(out).total_tokens == m["total_tokens"]


def _tree(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def test_deterministic_across_runs_and_workers(corpus, tokenizer, tmp_path):
    # Small work units so that two workers really split the input.
    kw = dict(shard_tokens=2000, unit_bytes=20_000, progress=False)
    a = tokenize_files([corpus], tokenizer, tmp_path / "a", workers=1, **kw)
    tokenize_files([corpus], tokenizer, tmp_path / "b", workers=2, **kw)
    tokenize_files([corpus], tokenizer, tmp_path / "c", workers=1, **kw)
    assert len(a.manifest["shards"]) >= 4
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") == _tree(tmp_path / "c")
    # The CLI with --workers 2 as well; unit size differs, so only the documents must match.
    assert cli(["tokenize", "--input", str(corpus), "--tokenizer", str(tokenizer), "--output",
                str(tmp_path / "d"), "--workers", "2"]) == 0
    d = load_manifest(tmp_path / "d")
    assert (d.total_docs, d.total_tokens) == (a.manifest["total_docs"], a.manifest["total_tokens"])


def test_bad_jsonl_lines_skipped_and_reported(tokenizer, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good one"}\n'
                    b'{"text": "unterminated\n'
                    b'{"body": "no text field"}\n'
                    b'\n'
                    b'{"text": ""}\n'
                    b'{"text": 17}\n'
                    b'{"text": "bad utf8 \xff\xfe"}\n'
                    b'[1, 2]\n'
                    b'{"text": "second good"}\n')
    assert cli(["tokenize", "--input", str(bad), "--tokenizer", str(tokenizer),
                "--output", str(tmp_path / "o")]) == 0
    report = capsys.readouterr().out
    m = load_manifest(tmp_path / "o")
    assert m.total_docs == 2
    assert m.data["skipped"] == {"empty": 1, "invalid_json": 1, "invalid_utf8": 1,
                                 "missing_field": 3}
    for line in (2, 3, 5, 6, 7, 8):
        assert f"{bad}:{line}:" in report
    assert "skipped: 1 empty document" in report

    r = _run_cli("tokenize", "--input", bad, "--tokenizer", tokenizer, "--output",
                 tmp_path / "s", "--strict")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{bad}:2:" in r.stderr and "--strict" in r.stderr


def test_max_doc_tokens_splits_and_keeps_text(corpus, tokenizer, tmp_path):
    res = tokenize_files([corpus / "doc0.txt"], tokenizer, tmp_path / "o", max_doc_tokens=100,
                         progress=False)
    docs = _read_shard_docs(tmp_path / "o" / "shard-000000.tar")
    assert len(docs) > 1 and max(d.size for d in docs) <= 100
    tok = load_tokenizer(tokenizer)
    assert tok.decode(np.concatenate(docs).tolist()) == (corpus / "doc0.txt").read_text()
    assert res.manifest["documents"] == 1 and res.manifest["total_docs"] == len(docs)


def test_user_errors_are_one_line(corpus, tokenizer, tmp_path):
    cases = [
        (["tokenize", "--input", tmp_path / "nope.jsonl", "--tokenizer", tokenizer,
          "--output", tmp_path / "o"], "nope.jsonl"),
        (["tokenize", "--input", corpus, "--tokenizer", tmp_path / "missing.model",
          "--output", tmp_path / "o"], "missing.model"),
        (["inspect", tmp_path / "nowhere"], "nowhere"),
        (["train-tokenizer", "--input", corpus / "doc0.txt", "--vocab-size", "100",
          "--output", tmp_path / "t"], "--vocab-size"),
    ]
    bad_manifest = tmp_path / "badm"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text('{"format": "something-else"}')
    cases.append((["inspect", bad_manifest], "manifest.json"))
    for args, needle in cases:
        r = _run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert needle in r.stderr


def test_hf_tokenizer_json_needs_tokenizers_or_works(corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    try:
        from tokenizers import Tokenizer, models
    except ImportError:
        path.write_text("{}")
        r = _run_cli("tokenize", "--input", corpus, "--tokenizer", path, "--output", tmp_path / "o")
        assert r.returncode == 2 and "tokenizers" in r.stderr and "Traceback" not in r.stderr
        return
    vocab = {"<|endoftext|>": 0, **{chr(c): c + 1 for c in range(33, 127)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    t.save(str(path))
    res = tokenize_files([corpus / "doc1.txt"], path, tmp_path / "o", progress=False)
    assert res.manifest["tokenizer"]["eos_id"] == 0


def test_inspect_reports_stats_and_samples(corpus, tokenizer, tmp_path, capsys):
    tokenize_files([corpus], tokenizer, tmp_path / "o", progress=False)
    assert cli(["inspect", str(tmp_path / "o"), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "document length in tokens" in out and out.count("--- document") == 2


def test_builtin_corpus_built_once_then_cached(tmp_path):
    kw = dict(vocab_size=512, target_bytes=300_000, shard_tokens=20_000)
    first = prepare_builtin_corpus(tmp_path, **kw)
    train, valid = load_manifest(first.train), load_manifest(first.valid)
    assert train.total_tokens > 50_000 and valid.total_docs >= 1
    assert len(train.shards) > 1 and train.vocab_size == 512
    assert train.data["tokenizer"]["sha256"] == valid.data["tokenizer"]["sha256"]
    stamp = first.train.stat().st_mtime_ns
    second = prepare_builtin_corpus(tmp_path, **kw)
    assert second == first and first.train.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []

    # A directory without its completion mark (an interrupted build) is rebuilt, not trusted.
    (first.train.parents[1] / "COMPLETE").unlink()
    first.train.unlink()
    third = prepare_builtin_corpus(tmp_path, **kw)
    assert load_manifest(third.train).data == train.data


def test_killed_tokenize_resumes_to_identical_output(corpus, tokenizer, tmp_path, monkeypatch):
    import rrwkv.data_tools.shards as shards

    kw = dict(shard_tokens=2000, unit_bytes=20_000, progress=False)
    tokenize_files([corpus], tokenizer, tmp_path / "clean", **kw)
    real, calls = shards.run_unit, []

    def dies_at_third_unit(unit, *a):
        calls.append(unit.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill between units
        return real(unit, *a)

    monkeypatch.setattr(shards, "run_unit", dies_at_third_unit)
    with pytest.raises(KeyboardInterrupt):
        tokenize_files([corpus], tokenizer, tmp_path / "resumed", **kw)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    done = sorted(p.name for p in (tmp_path / "resumed" / ".work").glob("unit-*.json"))
    assert done == ["unit-000000.json", "unit-000001.json"]
    monkeypatch.setattr(shards, "run_unit", real)
    tokenize_files([corpus], tokenizer, tmp_path / "resumed", **kw)
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "clean")


def test_builtin_corpus_two_processes_build_once(tmp_path):
    code = ("import sys, data_tools.builtin as b; "
            "real = b._build\n"
            "def build(*a, **k):\n"
            "    print('BUILT', flush=True); real(*a, **k)\n"
            "b._build = build\n"
            "print(b.prepare_builtin_corpus(sys.argv[1], vocab_size=400, target_bytes=150_000,"
            " shard_tokens=20_000).train)")
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(o.count("BUILT") for o in outs) == 1
    assert len({o.splitlines()[-1] for o in outs}) == 1
    assert load_manifest(outs[0].splitlines()[-1]).total_tokens > 0


def test_sample_docs_is_a_seeded_uniform_sample_in_one_pass():
    from rrwkv.data_tools.tokenizer import sample_documents
    docs = [f"doc {i}" for i in range(1000)]
    a = sample_documents(iter(docs), 50, seed=1)
    assert a == sample_documents(iter(docs), 50, seed=1) and a != sample_documents(iter(docs), 50, seed=2)
    assert len(set(a)) == 50 and set(a) <= set(docs)
    assert a == sorted(a, key=docs.index)                        # stream order kept
    # Uniform: every document is equally likely; the mean index of many samples sits near the middle.
    import statistics
    means = [statistics.mean(docs.index(d) for d in sample_documents(iter(docs), 50, seed=s)) for s in range(40)]
    assert 430 < statistics.mean(means) < 570
    assert sample_documents(iter(docs[:3]), 50) == docs[:3]


def test_byte_level_bpe_tokenizer_json_round_trips(corpus, tmp_path):
    """A Hugging Face byte-level BPE tokenizer.json (the kind GPT-NeoX-20B ships) works as --tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(_all_docs_of(corpus), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    out = tmp_path / "shards"
    assert cli(["tokenize", "--input", str(corpus), "--tokenizer", str(path), "--output", str(out)]) == 0
    m = load_manifest(out)
    assert m.eos_id == 0 and m.vocab_size == 700 and (out / "tokenizer.json").is_file()
    tok = load_tokenizer(m.tokenizer_path)
    got = [d for s in m.shards for d in _read_shard_docs(out / s["file"])]
    assert [tok.decode(d.tolist()) for d in got] == [d for d in _all_docs_of(corpus) if d]
