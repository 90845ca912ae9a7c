"""data_tools at scale: parquet and glob inputs, verify, merge, sliced array jobs through the
real preprocess.sbatch, import-binidx, progress lines, resume after kill -9, --strict lines."""
import json
import os
import signal
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from rrwkv.data_tools.cli import main as cli
from rrwkv.data_tools.binidx import import_binidx
from rrwkv.data_tools.manifest import load_manifest
from rrwkv.data_tools.reader import iter_shard_docs
from rrwkv.data_tools.shards import tokenize_files
from rrwkv.data_tools.tokenizer import load_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py", "glob.py",
         "heapq.py", "keyword.py", "this.py", "stringprep.py", "sched.py", "queue.py",
         "copy.py", "numbers.py", "token.py", "tabnanny.py"]


def _texts():
    return [(STDLIB / n).read_text(encoding="utf-8") for n in NAMES]


def _env():
    return dict(os.environ)


def _docs(shard_dir):
    m = load_manifest(shard_dir)
    return [d.tolist() for i in range(len(m.shards))
            for _, d in iter_shard_docs(m.shard_path(i), np.dtype(m.dtype))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    model = train_sentencepiece(_texts(), 500, d / "sp")
    src = d / "in"
    (src / "sub").mkdir(parents=True)
    lines = [json.dumps({"text": t}) + "\n" for t in _texts()]
    (src / "one.jsonl").write_text("".join(lines[:8]))
    (src / "sub" / "two.jsonl").write_text("".join(lines[8:]))
    return {"dir": d, "model": model, "src": src, "texts": _texts()}


def test_glob_and_parquet_inputs(setup, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = setup["texts"]
    rows = texts[:6] + [None, ""] + texts[6:]
    table = pa.table({"content": rows, "id": list(range(len(rows)))})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=3)
    # Units of a few row groups each, so later units number their rows after earlier ones.
    res = tokenize_files([tmp_path / "*.parquet"], setup["model"], tmp_path / "o",
                         text_key="content", unit_bytes=1, workers=2, progress=False)
    tok = load_tokenizer(setup["model"])
    assert [tok.decode(d) for d in _docs(tmp_path / "o")] == [t for t in rows if t]
    assert res.manifest["skipped"] == {"empty": 1, "missing_field": 1}
    assert [ex for r in res.reports for ex in r.examples] == [
        (7, "no string field 'content'"), (8, "empty document")]
    r = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", "tokenize", "--input",
                        str(tmp_path / "docs.parquet"), "--tokenizer", str(setup["model"]),
                        "--output", str(tmp_path / "s"), "--text-key", "content", "--strict",
                        "--unit-mb", "0.000001"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "docs.parquet:7:" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="no column 'text'.*--text-key"):
        tokenize_files([tmp_path / "docs.parquet"], setup["model"], tmp_path / "t",
                       progress=False)
    # Recursive glob over jsonl files in subdirectories; a pattern matching nothing is an error.
    g = tokenize_files([str(setup["src"]) + "/**/*.jsonl"], setup["model"], tmp_path / "g",
                       progress=False)
    assert g.manifest["total_docs"] == len(texts)
    with pytest.raises(FileNotFoundError, match=r"nothing\*.jsonl"):
        tokenize_files([tmp_path / "nothing*.jsonl"], setup["model"], tmp_path / "x")


def test_strict_names_the_line_in_a_later_work_unit(setup, tmp_path):
    lines = [json.dumps({"text": t}) + "\n" for t in setup["texts"]]
    lines.insert(13, '{"text": broken\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    r = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", "tokenize", "--input", str(bad),
                        "--tokenizer", str(setup["model"]), "--output", str(tmp_path / "o"),
                        "--strict", "--unit-mb", "0.02", "--workers", "2"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:14:" in r.stderr, r.stderr
    res = tokenize_files([bad], setup["model"], tmp_path / "ok", unit_bytes=20_000,
                         progress=False)
    assert len(res.manifest["shards"]) > 1 and res.reports[0].examples[0][0] == 14


def test_verify_finds_tampering(setup, tmp_path):
    out = tmp_path / "o"
    tokenize_files([setup["src"]], setup["model"], out, shard_tokens=3000, progress=False)
    r = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", "verify", str(out)], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK")
    shard = out / "shard-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF                                  # one flipped byte inside token data
    shard.write_bytes(bytes(raw))
    (out / "shard-000002.tar").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", "verify", str(out)], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "shard-000001.tar: sha256 differs" in r.stdout
    assert "shard-000002.tar" in r.stdout and "2 file(s)" in r.stdout


def test_sliced_array_job_merges_to_the_unsliced_shards(setup, tmp_path):
    kw = ["--tokenizer", setup["model"], "--shard-tokens", "2000", "--unit-mb", "0.02"]
    whole = tmp_path / "whole"
    assert cli(["tokenize", "--input", str(setup["src"]), "--output", str(whole),
                *map(str, kw)]) == 0
    out = tmp_path / "sliced"
    procs = []
    for task in (3, 4, 5):     # --array=3-5: three tasks started together
        env = {**_env(), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "3",
               "SLURM_ARRAY_TASK_MAX": "5", "SLURM_CPUS_PER_TASK": "1", "PYTHON": sys.executable}
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "launch/slurm/preprocess.sbatch"), "--input", str(setup["src"]),
             "--output", str(out), *map(str, kw)], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("merged 3 slice(s)" in o for o, _ in outs) == 1
    a, b = load_manifest(whole), load_manifest(out)
    assert len(b.shards) == len(a.shards) > 3
    assert [s["sha256"] for s in b.shards] == [s["sha256"] for s in a.shards]
    assert [(s["docs"], s["tokens"]) for s in b.shards] == [(s["docs"], s["tokens"])
                                                            for s in a.shards]
    assert all(s["file"].startswith("slices/") for s in b.shards)
    assert _docs(out) == _docs(whole)
    assert cli(["verify", str(out)]) == 0
    # merge as a command: sets outside the output directory are linked in.
    assert cli(["merge", str(whole), str(out / "slices" / "00000-of-00003"),
                "--output", str(tmp_path / "m")]) == 0
    m = load_manifest(tmp_path / "m")
    assert m.total_tokens == a.total_tokens + load_manifest(
        out / "slices" / "00000-of-00003").total_tokens
    assert cli(["verify", str(tmp_path / "m")]) == 0


def _write_binidx(prefix, docs, dtype=np.uint16, code=8):
    """Megatron-LM's mmap indexed dataset, written from its format description."""
    sizes = np.array([len(d) for d in docs], np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1))
        f.write(sizes.tobytes() + pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(docs) + 1, dtype=np.int64).tobytes())


def test_import_binidx_round_trip(setup, tmp_path):
    tok = load_tokenizer(setup["model"])
    docs = [tok.encode(t) + [tok.eos_id] for t in setup["texts"]]   # as --append-eod writes them
    _write_binidx(tmp_path / "neox_text_document", docs[:5] + [[tok.eos_id]] + docs[5:])
    res = import_binidx(tmp_path / "neox_text_document", setup["model"], tmp_path / "o",
                        workers=2, unit_tokens=5000, shard_tokens=4000, progress=False)
    assert len(res.manifest["shards"]) > 2
    assert res.manifest["skipped"] == {"empty": 1}
    assert [tok.decode(d) for d in _docs(tmp_path / "o")] == setup["texts"]
    assert cli(["verify", str(tmp_path / "o")]) == 0
    _write_binidx(tmp_path / "wide", [[1, 2, 70000]], np.int32, 4)
    with pytest.raises(ValueError, match="70000.*vocabulary"):
        import_binidx(tmp_path / "wide", setup["model"], tmp_path / "w", progress=False)
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, long enough to read")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="junk.idx"):
        import_binidx(tmp_path / "junk", setup["model"], tmp_path / "j", progress=False)


def test_progress_lines_in_a_log(setup, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", "tokenize", "--input",
                        str(setup["src"]), "--tokenizer", str(setup["model"]), "--output",
                        str(tmp_path / "o"), "--unit-mb", "0.02", "--log-every", "0"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 4 and "\r" not in r.stderr
    for key in ("units", "MB", "docs/s", "MB/s", "tokens/s", "ETA"):
        assert key in lines[0]
    assert lines[-1].startswith("tokenize: ") and "100.0%" in lines[-1]


def test_kill_9_mid_run_then_resume_gives_identical_output(setup, tmp_path):
    # A corpus big enough that the run is still going when the first units are done.
    big = tmp_path / "big.jsonl"
    line = [json.dumps({"text": t}) + "\n" for t in setup["texts"]]
    big.write_text("".join(line * 8))
    args = ["--input", str(big), "--tokenizer", str(setup["model"]), "--shard-tokens", "5000",
            "--unit-mb", "0.05", "--no-progress"]
    assert cli(["tokenize", *args, "--output", str(tmp_path / "clean")]) == 0
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "rrwkv.data_tools", "tokenize", *args, "--output",
                          str(out), "--workers", "2"], env=_env(), start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / ".work").glob("unit-*.json")):
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)                  # the parent and its workers, mid-run
    p.wait()
    assert not (out / "manifest.json").exists()
    assert list((out / ".work").glob("unit-*.json"))
    assert cli(["tokenize", *args, "--output", str(out), "--workers", "2"]) == 0
    tree = lambda d: {q.name: q.read_bytes() for q in sorted(Path(d).iterdir())}
    assert tree(out) == tree(tmp_path / "clean")


def test_shard_writer_matches_webdataset_tarwriter(setup, tmp_path):
    """Shards are written with tarfile directly (no torch import in workers); the bytes must be
    exactly what webdataset's TarWriter writes for the same samples."""
    import io

    import webdataset as wds

    from rrwkv.data_tools.shards import _NpyTarWriter

    tok = load_tokenizer(setup["model"])
    arrays = [np.asarray(tok.encode(t), np.uint16) for t in setup["texts"][:5]] + \
        [np.zeros(0, np.uint16)]
    ours, theirs = io.BytesIO(), io.BytesIO()
    a = _NpyTarWriter(ours, "rrwkv", "rrwkv", 0o444, 0)
    b = wds.TarWriter(theirs, user="rrwkv", group="rrwkv", mode=0o444, mtime=0)
    for i, arr in enumerate(arrays):
        a.write({"__key__": f"000000-{i:09d}", "npy": arr})
        b.write({"__key__": f"000000-{i:09d}", "npy": arr})
    a.close()
    b.close()
    assert ours.getvalue() == theirs.getvalue()
    got = [s["npy"] for s in wds.WebDataset(f"pipe:cat {_save(tmp_path, ours)}",
                                            shardshuffle=False).decode()]
    assert all(np.array_equal(g, w) for g, w in zip(got, arrays)) and len(got) == len(arrays)


def _save(tmp_path, buf):
    p = tmp_path / "w.tar"
    p.write_bytes(buf.getvalue())
    return p
