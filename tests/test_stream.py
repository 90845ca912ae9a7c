"""TokenStream on real shards (stdlib text, real sentencepiece, webdataset tars)."""
import io
import json
import shutil
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.shards import tokenize_files
from data_tools.tokenizer import train_sentencepiece
from pretrain.data import TokenStream, check_tokenizer, load_manifest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Files of very different sizes, so shards and documents are unequal.
FILES_A = ["this.py", "keyword.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py",
           "textwrap.py", "shlex.py", "glob.py", "stringprep.py", "tabnanny.py", "sched.py"]
FILES_B = ["token.py", "copy.py", "queue.py", "numbers.py"]
EOS = 2


def _texts(names):
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    model = train_sentencepiece(_texts(FILES_A + FILES_B), 400, d / "sp")
    other = train_sentencepiece(_texts(FILES_A[:6]), 380, d / "other")
    for name, files in (("a", FILES_A), ("b", FILES_B)):
        src = d / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(files)))
        # Uneven shards: a shard closes after the document that crosses 9000 tokens.
        tokenize_files([src], model, d / name, shard_tokens=9000, progress=False)
    return {"a": d / "a", "b": d / "b", "model": model, "other": other, "dir": d}


def reference_epoch(shard_dir, seed, epoch, source_index=0):
    """The packed stream of one epoch, read with plain tarfile + np.load."""
    m = json.loads((Path(shard_dir) / "manifest.json").read_text())
    order = np.random.default_rng([seed, source_index, epoch]).permutation(len(m["shards"]))
    parts = []
    for i in order:
        with tarfile.open(Path(shard_dir) / m["shards"][i]["file"]) as tf:
            for member in tf.getmembers():
                parts += [np.load(io.BytesIO(tf.extractfile(member).read())), [EOS]]
    return np.concatenate(parts).astype(np.int64)


def windows(batches):
    """Rows as seq_len + 1 token windows, checking the input/label relation on the way."""
    rows = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("world,workers,S,B", [(2, 0, 64, 4), (2, 2, 32, 3), (3, 0, 100, 2)])
def test_one_epoch_every_token_once(data, world, workers, S, B):
    shards = load_manifest(data["a"]).shards
    assert len(shards) >= 3 and len({s["tokens"] for s in shards}) == len(shards)
    ref = reference_epoch(data["a"], seed=5, epoch=0)
    got, counts = [], []
    for rank in range(world):
        s = TokenStream(data["a"], S, B, rank=rank, world_size=world, num_workers=workers,
                        seed=5, max_epochs=1)
        batches = list(s)
        counts.append(len(batches))
        assert len(batches) == len(s) == s.batches_per_epoch
        got.append(windows(batches))
    assert len(set(counts)) == 1  # every rank the same number of batches
    n_windows = (len(ref) - 1) // S
    parts = world * max(1, workers)
    used = counts[0] * B * world
    assert n_windows - used < parts * B  # only the remainder smaller than a batch per part
    # Ranks take contiguous ranges in rank order; workers' batches interleave within a rank.
    all_rows = sorted((tuple(r) for g in got for r in g))
    expect = sorted(tuple(ref[i * S:i * S + S + 1]) for i in range(used))
    assert all_rows == expect
    first_rank = got[0] if workers == 0 else None
    if first_rank is not None:
        assert np.array_equal(first_rank, np.stack([ref[i * S:i * S + S + 1]
                                                    for i in range(counts[0] * B)]))
    # Every token of the used range is predicted exactly once (labels cover it without overlap).
    labels = np.concatenate([g[:, 1:].reshape(-1) for g in got])
    assert labels.size == used * S


def test_epochs_reshuffle_shards_and_max_epochs(data):
    s = TokenStream(data["a"], 64, 2, max_epochs=2, seed=1)
    batches = list(s)
    n = s.batches_per_epoch
    assert len(batches) == 2 * n and s.epoch == 2
    e0, e1 = windows(batches[:n]), windows(batches[n:])
    for rows, epoch in ((e0, 0), (e1, 1)):
        ref = reference_epoch(data["a"], 1, epoch)
        assert np.array_equal(rows, np.stack([ref[i * 64:i * 64 + 65] for i in range(len(rows))]))
    assert not np.array_equal(e0, e1)
    endless = iter(TokenStream(data["a"], 64, 2, seed=1))
    assert sum(1 for _ in zip(range(3 * n), endless)) == 3 * n


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(data, workers):
    kw = dict(seq_len=48, micro_batch_size=3, rank=1, world_size=2, num_workers=workers,
              seed=3, max_epochs=2)
    full = list(TokenStream(data["a"], **kw))
    for cut in (0, 1, 5, len(full) // 2 + 1, len(full) - 1):
        s = TokenStream(data["a"], **kw)
        it = iter(s)
        head = [next(it) for _ in range(cut)]
        sd = json.loads(json.dumps(s.state_dict()))  # small and plain: survives JSON
        del it
        resumed = TokenStream(data["a"], **kw)
        resumed.load_state_dict(sd)
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        for (x, y), (fx, fy) in zip(head + tail, full):
            assert torch.equal(x, fx) and torch.equal(y, fy)


def test_mixing_follows_weights(data):
    S, B = 32, 2
    rows_a = {tuple(r) for r in windows(TokenStream(data["a"], S, B, max_epochs=1))}
    s = TokenStream([(data["a"], 3.0), (data["b"], 1.0)], S, B)
    it = iter(s)
    picks = []
    for _ in range(400):
        x, y = next(it)
        picks.append(tuple(torch.cat([x[0], y[0, -1:]]).tolist()) in rows_a)
    share = sum(picks) / len(picks)
    assert abs(share - 0.75) <= 0.01
    sd = s.state_dict()
    again = TokenStream([(data["a"], 3.0), (data["b"], 1.0)], S, B)
    again.load_state_dict(sd)
    x1, _ = next(iter(again))
    x2, _ = next(it)
    assert torch.equal(x1, x2)


def test_clear_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        TokenStream(tmp_path / "nothing-here", 16, 2)
    broken = tmp_path / "broken"
    shutil.copytree(data["a"], broken)
    (broken / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        TokenStream(broken, 16, 2)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        TokenStream(broken, 16, 2)
    with pytest.raises(ValueError, match="sha256 differs"):
        check_tokenizer(data["a"], tokenizer_path=data["other"])
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_tokenizer(data["a"], vocab_size=256)
    assert check_tokenizer(data["a"], data["model"], vocab_size=400).vocab_size == 400
    with pytest.raises(FileNotFoundError, match="missing.model"):
        check_tokenizer(data["a"], tokenizer_path=tmp_path / "missing.model")
    with pytest.raises(ValueError, match="too few"):
        TokenStream(data["b"], 4096, 64, world_size=8)
    s = TokenStream(data["a"], 16, 2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        TokenStream(data["a"], 16, 2, world_size=4).load_state_dict(s.state_dict())


def test_mixing_needs_one_tokenizer(data):
    d = data["dir"]
    tokenize_files([d / "b.jsonl"], data["other"], d / "b-other", progress=False)
    with pytest.raises(ValueError, match="different tokenizers"):
        TokenStream([(data["a"], 1), (d / "b-other", 1)], 16, 2)


def test_truncated_shard_is_named(data, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(data["a"], cut)
    m = load_manifest(cut)
    shard = m.shard_path(0)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    s = TokenStream(cut, 64, 4, max_epochs=1, seed=0)
    with pytest.raises(ValueError, match="shard-000000.tar|fewer tokens"):
        list(s)
