"""data_tools on bad input: damaged compressed files, a wrong --text-key, --overwrite that fails
part way, outputs that are files, and other mistakes: one line each, never a traceback."""
import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import zstandard

from rrwkv.data_tools.cli import main as cli
from rrwkv.data_tools.manifest import load_manifest
from rrwkv.data_tools.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 2000


def _lines(n=N_DOCS):
    return "".join(json.dumps({"text": f"document {i}: " + "some words " * (i % 40), "id": i}) + "\n"
                   for i in range(n)).encode()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2,000 JSON lines as .jsonl, .jsonl.gz and .jsonl.zst, cut-short and corrupt copies, and a
    tokenizer trained on them."""
    d = tmp_path_factory.mktemp("faults")
    raw = _lines()
    gz, zst = gzip.compress(raw), zstandard.ZstdCompressor().compress(raw)
    files = {"plain": raw, "gz": gz, "zst": zst, "cut_gz": gz[:len(gz) // 2],
             "cut_zst": zst[:len(zst) * 3 // 4], "bad_gz": b"not gzip data " * 50,
             "bad_zst": b"not zstd data " * 50}
    paths = {}
    for name, blob in files.items():
        suffix = {"plain": ".jsonl"}.get(name, ".jsonl." + name.rsplit("_", 1)[-1])
        paths[name] = d / f"{name}{suffix}"
        paths[name].write_bytes(blob)
    paths["model"] = train_sentencepiece([json.loads(l)["text"] for l in raw.splitlines()[:300]],
                                         300, d / "sp")
    return paths


def _error(capsys, rc) -> str:
    """The CLI's stderr, checked to be one error line (exit 2)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def _tokenize(data, inputs, out, *extra):
    return cli(["tokenize", "--input", *map(str, inputs), "--tokenizer", str(data["model"]),
                "--output", str(out), "--no-progress", *map(str, extra)])


def _files(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def _complete_lines(name, blob):
    """Documents a reader can recover from a cut-short file: its whole decompressed lines."""
    if name.endswith("gz"):
        part = zlib.decompressobj(wbits=31).decompress(blob)
    else:
        part = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return part.count(b"\n")


@pytest.mark.parametrize("name", ["cut_gz", "cut_zst"])
def test_cut_short_compressed_input_is_read_up_to_the_damage(data, name, tmp_path, capsys):
    path = data[name]
    kept = _complete_lines(name, path.read_bytes())
    assert 0 < kept < N_DOCS
    assert _tokenize(data, [path], tmp_path / "o") == 0
    out = capsys.readouterr().out
    m = load_manifest(tmp_path / "o")
    assert m.total_docs == kept and m.data["skipped"] == {"damaged": 1}
    assert "skipped: 1 compressed input file(s) cut short or corrupt" in out
    assert f"{path}: compressed data ends early" in out
    assert f"after {kept:,} records" in out and "the rest of the file was not read" in out

    err = _error(capsys, _tokenize(data, [path], tmp_path / "s", "--strict"))
    assert f"{path}: compressed data ends early" in err and f"after {kept:,} records" in err
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["bad_gz", "bad_zst"])
def test_corrupt_compressed_input_is_reported(data, name, tmp_path, capsys):
    path = data[name]
    assert _tokenize(data, [path, data["plain"]], tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert load_manifest(tmp_path / "o").total_docs == N_DOCS
    assert f"{path}: compressed data is corrupt" in out and "after 0 records" in out
    err = _error(capsys, _tokenize(data, [path], tmp_path / "s", "--strict"))
    assert f"{path}: compressed data is corrupt" in err and "--strict" in err


def test_whole_compressed_inputs_are_read_to_the_end(data, tmp_path, capsys):
    """Several zstd frames (as `zstd` writes big files) and empty compressed files are no damage."""
    raw = _lines()
    c = zstandard.ZstdCompressor()
    frames = tmp_path / "frames.jsonl.zst"
    frames.write_bytes(b"".join(c.compress(raw[i:i + 50_000]) for i in range(0, len(raw), 50_000)))
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    inputs = [frames, tmp_path / "empty.jsonl.zst", tmp_path / "empty.jsonl.gz", data["gz"],
              data["zst"]]
    assert _tokenize(data, inputs, tmp_path / "o", "--strict") == 0
    m = load_manifest(tmp_path / "o")
    assert m.total_docs == 3 * N_DOCS and m.data["skipped"] == {}


def test_train_tokenizer_warns_of_a_cut_short_input(data, tmp_path, capsys):
    assert cli(["train-tokenizer", "--input", str(data["cut_zst"]), "--vocab-size", "300",
                "--output", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {data['cut_zst']}: compressed data ends early" in err


def test_damaged_parquet_row_group_keeps_the_rows_before(data, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [json.loads(l)["text"] for l in _lines(400).splitlines()]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    raw = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    raw[page:page + 64] = bytes(64)                   # the third row group's page header
    path.write_bytes(bytes(raw))
    assert _tokenize(data, [path], tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert load_manifest(tmp_path / "o").total_docs == 200
    assert f"{path}: parquet data is corrupt" in out and "rows 201..400 were not read" in out
    err = _error(capsys, _tokenize(data, [path], tmp_path / "s", "--strict"))
    assert f"{path}: parquet data is corrupt" in err
    (tmp_path / "cut.parquet").write_bytes(bytes(raw[:len(raw) // 2]))
    err = _error(capsys, _tokenize(data, [tmp_path / "cut.parquet"], tmp_path / "c"))
    assert "cut.parquet is not a readable parquet file" in err


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", ["plain", "gz"])
def test_text_key_no_record_has_is_an_error(data, name, strict, tmp_path, capsys):
    rc = _tokenize(data, [data[name]], tmp_path / "o", "--text-key", "txt",
                   *(["--strict"] if strict else []))
    err = _error(capsys, rc)
    assert str(data[name]) in err and "'txt'" in err and "--text-key" in err
    assert "keys 'text', 'id'" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_text_key_missing_from_some_records_is_skipped(data, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"body": "no text here"}\n{"text": "a document"}\n')
    assert _tokenize(data, [mixed], tmp_path / "o") == 0
    assert load_manifest(tmp_path / "o").total_docs == 1
    assert "mixed.jsonl:1: no string field 'text' (keys 'body')" in capsys.readouterr().out


def test_train_tokenizer_text_key_typo_is_an_error(data, tmp_path, capsys):
    rc = cli(["train-tokenizer", "--input", str(data["plain"]), "--vocab-size", "300",
              "--output", str(tmp_path / "t"), "--text-key", "txt"])
    err = _error(capsys, rc)
    assert f"no record of {data['plain']} has a string field 'txt'" in err


def test_failed_overwrite_keeps_the_finished_set(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert _tokenize(data, [data["plain"]], out, "--shard-tokens", "20000") == 0
    before = _files(out)
    assert len(load_manifest(out).shards) > 1
    (tmp_path / "empty.jsonl").write_text("")
    for bad in (["--input", data["cut_gz"], "--strict"], ["--input", data["plain"], "--text-key", "txt"],
                ["--input", tmp_path / "empty.jsonl"]):          # no document at all: an error, not an empty set
        rc = cli(["tokenize", *map(str, bad), "--tokenizer", str(data["model"]), "--output",
                  str(out), "--overwrite", "--no-progress"])
        err = _error(capsys, rc)
        assert f"the shard set already in {out} was kept" in err
        assert "empty.jsonl" not in bad[1].name or "no document to write" in err
        assert _files(out) == before
        assert cli(["verify", str(out)]) == 0
    # A good replacement goes in whole: fewer shards, none of the old ones left over.
    assert _tokenize(data, [data["zst"]], out, "--overwrite") == 0
    m = load_manifest(out)
    assert len(m.shards) == 1 and m.total_docs == N_DOCS
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar",
                                                     "tokenizer.model"]


def test_failed_merge_overwrite_keeps_the_finished_set(data, tmp_path, capsys):
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert _tokenize(data, [data["plain"]], a, "--shard-tokens", "20000") == 0
    assert _tokenize(data, [data["gz"]], b, "--shard-tokens", "30000") == 0
    assert cli(["merge", str(a), "--output", str(m)]) == 0
    before = _files(m)
    tok = (b / "tokenizer.model").read_bytes()
    (b / "tokenizer.model").unlink()
    err = _error(capsys, cli(["merge", str(b), str(a), "--output", str(m), "--overwrite"]))
    assert f"tokenizer {b / 'tokenizer.model'}" in err and f"already in {m} was kept" in err
    # A set in the output whose shards the linked-in ones would replace.
    (b / "tokenizer.model").write_bytes(tok)
    err = _error(capsys, cli(["merge", str(b), str(m), "--output", str(m), "--overwrite"]))
    assert "twice" in err and f"already in {m} was kept" in err
    assert _files(m) == before and sorted(p.name for p in m.iterdir()) == sorted(before)
    assert cli(["verify", str(m)]) == 0

    assert cli(["merge", str(b), str(a), "--output", str(m), "--overwrite"]) == 0
    merged = load_manifest(m)
    assert merged.total_docs == 2 * N_DOCS
    assert sorted(p.name for p in m.glob("shard-*.tar")) == [s["file"] for s in merged.shards]
    assert cli(["verify", str(m)]) == 0


def test_output_that_is_a_file_is_one_line(data, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert _tokenize(data, [data["plain"]], tmp_path / "set") == 0
    capsys.readouterr()
    for out in (taken, taken / "sub"):
        for args in (["tokenize", "--input", data["plain"], "--tokenizer", data["model"],
                      "--output", out],
                     ["merge", tmp_path / "set", "--output", out],
                     ["train-tokenizer", "--input", data["plain"], "--vocab-size", "300",
                      "--output", out / "tok"]):
            err = _error(capsys, cli(list(map(str, args))))
            assert f"output {out} is an existing file or lies under one" in err


def test_other_bad_input_is_one_line(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    good = tmp_path / "good"
    assert _tokenize(data, [data["plain"]], good) == 0
    damaged = {}
    for name, change in [("file_type", ("shards", 0, "file", 5)),
                         ("docs_type", ("shards", 0, "docs", "3")),
                         ("eos_type", ("tokenizer", None, "eos_id", "2")),
                         ("tok_path", ("tokenizer", None, "path", None))]:
        d = tmp_path / name
        d.mkdir()
        m = json.loads((good / "manifest.json").read_text())
        field, index, key, value = change
        (m[field][index] if index is not None else m[field])[key] = value
        (d / "manifest.json").write_text(json.dumps(m))
        damaged[name] = d
    tok = ["--tokenizer", data["model"]]
    cases = [
        (["tokenize", "--input", tmp_path / "missing.jsonl", *tok, "--output", tmp_path / "o"],
         "missing.jsonl"),
        (["tokenize", "--input", tmp_path / "empty", *tok, "--output", tmp_path / "o"], "empty"),
        (["tokenize", "--input", data["plain"], "--tokenizer", tmp_path / "junk.model",
          "--output", tmp_path / "o"], "junk.model"),
        (["tokenize", "--input", data["plain"], "--tokenizer", tmp_path / "tokenizer.json",
          "--output", tmp_path / "o"], "tokenizer.json"),
        (["tokenize", "--input", data["plain"], "--tokenizer", tmp_path, "--output",
          tmp_path / "o"], "is a directory"),
        (["tokenize", "--input", data["plain"], *tok, "--output", tmp_path / "o", "--unit-mb",
          "0"], "--unit-mb"),
        (["train-tokenizer", "--input", data["plain"], "--vocab-size", "300", "--output",
          tmp_path / "t", "--max-docs", "-1"], "--max-docs"),
        (["train-tokenizer", "--input", tmp_path / "empty", "--vocab-size", "300", "--output",
          tmp_path / "t"], "empty"),
        (["inspect", tmp_path / "empty"], "empty"),
        (["verify", tmp_path / "missing"], "missing"),
        (["merge", tmp_path / "missing", "--output", tmp_path / "m"], "missing"),
    ] + [([cmd, d] if cmd != "merge" else [cmd, d, "--output", tmp_path / f"m-{name}"],
          "is damaged") for name, d in damaged.items() for cmd in ("inspect", "verify", "merge")]
    for args, needle in cases:
        err = _error(capsys, cli(list(map(str, args))))
        assert needle in err, (args, err)


def test_cli_program_prints_one_line_not_a_traceback(data, tmp_path):
    """The same through `python -m rrwkv.data_tools`, as a user runs it."""
    for args, needle in [(["tokenize", "--input", data["bad_zst"], "--tokenizer", data["model"],
                           "--output", tmp_path / "o", "--strict"], "is corrupt"),
                         (["tokenize", "--input", data["plain"], "--tokenizer", data["model"],
                           "--output", data["plain"]], "--output")]:
        r = subprocess.run([sys.executable, "-m", "rrwkv.data_tools", *map(str, args)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_tokenizer_is_one_line(data, tmp_path, capsys):
    tok = tmp_path / "sp.model"
    tok.write_bytes(data["model"].read_bytes())
    tok.chmod(0)
    err = _error(capsys, cli(["tokenize", "--input", str(data["plain"]), "--tokenizer", str(tok),
                              "--output", str(tmp_path / "o")]))
    assert "Permission denied" in err and str(tok) in err
