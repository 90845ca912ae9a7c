"""TokenStream on real shards (stdlib text, real sentencepiece, webdataset tars)."""
import functools
import http.server
import io
import json
import shutil
import sysconfig
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rrwkv.data_tools.shards import tokenize_files
from rrwkv.data_tools.tokenizer import train_sentencepiece
from rrwkv.pretrain.data import TokenStream, check_tokenizer, load_manifest
from rrwkv.pretrain.data.stream import CorruptShardWarning

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
                        seed=5, max_epochs=1, shuffle_tokens=0)
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
    s = TokenStream(data["a"], 64, 2, max_epochs=2, seed=1, shuffle_tokens=0)
    batches = list(s)
    n = s.batches_per_epoch
    assert len(batches) == 2 * n and s.epoch == 2
    e0, e1 = windows(batches[:n]), windows(batches[n:])
    for rows, epoch in ((e0, 0), (e1, 1)):
        ref = reference_epoch(data["a"], 1, epoch)
        assert np.array_equal(rows, np.stack([ref[i * 64:i * 64 + 65] for i in range(len(rows))]))
    assert not np.array_equal(e0, e1)
    endless = iter(TokenStream(data["a"], 64, 2, seed=1, shuffle_tokens=0))
    assert sum(1 for _ in zip(range(3 * n), endless)) == 3 * n


@pytest.mark.parametrize("workers,shuffle", [(0, 0), (2, 0), (0, 700), (2, 700)])
def test_resume_is_exact(data, workers, shuffle):
    # shuffle 700: several shuffle buffers per part, cuts fall inside buffers.
    kw = dict(seq_len=48, micro_batch_size=3, rank=1, world_size=2, num_workers=workers,
              seed=3, max_epochs=2, shuffle_tokens=shuffle)
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


def test_mixing_follows_weights_over_10k_batches(data):
    S, B, n = 16, 1, 10_000
    kw = dict(seq_len=S, micro_batch_size=B, seed=4, shuffle_tokens=0)
    # Which source a batch came from, told by its content: a's windows of the epochs it can reach.
    per_epoch = TokenStream(data["a"], **kw).batches_per_epoch
    rows_a = set()
    for epoch in range(n // per_epoch + 2):
        ref = reference_epoch(data["a"], 4, epoch)
        rows_a.update(tuple(ref[i * S:i * S + S + 1]) for i in range(per_epoch))
    mixed = [(data["a"], 3.0), (data["b"], 1.0)]
    s = TokenStream(mixed, **kw)
    it = iter(s)
    picks = [tuple(torch.cat([x[0], y[0, -1:]]).tolist()) in rows_a
             for x, y in (next(it) for _ in range(n))]
    assert abs(sum(picks) / n - 0.75) <= 0.01
    assert s.stats()["batches_by_source"] == [sum(picks), n - sum(picks)]
    # Over any 10k-batch window too, and without a fixed period (it would line up with
    # gradient accumulation): the pattern of 8-batch groups varies.
    more = [tuple(torch.cat([x[0], y[0, -1:]]).tolist()) in rows_a
            for x, y in (next(it) for _ in range(1000))]
    window = (picks + more)[1000:]
    assert abs(sum(window) / n - 0.75) <= 0.01
    assert len({tuple(picks[i:i + 8]) for i in range(0, 800, 8)}) > 5
    # Seeded: another seed picks another order with the same proportions; resume is exact.
    other = iter(TokenStream(mixed, **{**kw, "seed": 5}))
    assert [next(other)[0].sum() for _ in range(64)] != [0] * 64
    sd = s.state_dict()
    again = TokenStream(mixed, **kw)
    again.load_state_dict(sd)
    x1, _ = next(iter(again))
    x2, _ = next(it)
    assert torch.equal(x1, x2)


def test_shuffle_buffer_mixes_documents_within_buffers(data):
    S, B, K = 64, 4, 6000
    ref = reference_epoch(data["a"], 7, 0)
    ends = np.flatnonzero(ref == EOS) + 1
    doc_spans = list(zip(np.concatenate([[0], ends[:-1]]), ends))   # (start, end) incl. EOS
    whole = 0
    for rank in range(2):
        s = TokenStream(data["a"], S, B, rank=rank, world_size=2, seed=7, max_epochs=1,
                        shuffle_tokens=K)
        rows = windows(list(s))
        part = np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])   # the part's token stream
        n = part.size
        begin = rank * s.batches_per_part[0] * B * S
        want = ref[begin:begin + n]
        assert n == s.batches_per_part[0] * B * S + 1 and not np.array_equal(part, want)
        for lo in range(0, n, K):                  # each buffer holds exactly its own tokens
            assert np.array_equal(np.sort(part[lo:lo + K]), np.sort(want[lo:lo + K]))
            # A document (with its EOS) wholly inside the buffer comes out in one piece.
            docs = [(a, b) for a, b in doc_spans
                    if begin + lo <= a and b <= begin + min(lo + K, n) and b - a > 3]
            text = part[lo:lo + K].tobytes()
            assert all(ref[a:b].tobytes() in text for a, b in docs)
            whole += len(docs)
    assert whole >= 4
    again = windows(TokenStream(data["a"], S, B, world_size=2, seed=7, max_epochs=1,
                                shuffle_tokens=K))
    reseeded = windows(TokenStream(data["a"], S, B, world_size=2, seed=8, max_epochs=1,
                                   shuffle_tokens=K))
    first = windows(TokenStream(data["a"], S, B, world_size=2, seed=7, max_epochs=1,
                                shuffle_tokens=K))
    assert np.array_equal(first, again) and not np.array_equal(first, reseeded)


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


def _damaged_copy(src, dst, how):
    shutil.copytree(src, dst)
    m = load_manifest(dst)
    shard = m.shard_path(1)
    raw = shard.read_bytes()
    if how == "truncated":
        shard.write_bytes(raw[: len(raw) // 3])
    else:  # garbage over the middle of the shard
        mid = len(raw) // 2
        shard.write_bytes(raw[:mid] + b"\x5a" * 2048 + raw[mid + 2048:])
    return shard


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_warns_counts_and_goes_on(data, tmp_path, how, workers):
    shard = _damaged_copy(data["a"], tmp_path / "bad", how)
    counts, corrupt, seen = [], 0, []
    for rank in range(2):
        s = TokenStream(tmp_path / "bad", 32, 2, rank=rank, world_size=2, num_workers=workers,
                        max_epochs=2, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(s)
        seen += [str(w.message) for w in caught if w.category is CorruptShardWarning]
        counts.append(len(batches))
        assert len(batches) == len(s)       # the full number of batches: no rank runs short
        st = s.stats()
        corrupt += st["corrupt_shards"]
        assert st["corrupt_shard_files"] == [str(shard)] * st["corrupt_shards"]
        assert st["tokens"] == len(batches) * 64 and st["data_wait_s"] > 0
    assert counts[0] == counts[1]
    assert corrupt == len(seen) >= 1 and all(shard.name in m for m in seen)
    with pytest.raises(ValueError, match=shard.name):
        list(TokenStream(tmp_path / "bad", 32, 2, max_epochs=2, on_corrupt="raise"))


def test_equal_batches_per_rank_with_very_unequal_shards(data, tmp_path):
    # One 230 kB document beside a few tiny ones: shards of very different sizes.
    src = tmp_path / "uneven.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n"
                           for t in _texts(["this.py", "_pydecimal.py", "keyword.py", "token.py"])))
    tokenize_files([src], data["model"], tmp_path / "u", shard_tokens=500, progress=False)
    sizes = [s["tokens"] for s in load_manifest(tmp_path / "u").shards]
    assert max(sizes) > 50 * min(sizes)
    for world, workers in ((2, 0), (3, 2), (4, 0)):
        lengths = [len(list(TokenStream(tmp_path / "u", 128, 2, rank=r, world_size=world,
                                        num_workers=workers, max_epochs=1, seed=r)))
                   for r in range(world)]
        assert len(set(lengths)) == 1 and lengths[0] > 0


def test_remote_shards_through_pipe_and_http(data, tmp_path):
    kw = dict(seq_len=32, micro_batch_size=2, max_epochs=1, seed=2, shuffle_tokens=500)
    local = windows(TokenStream(data["a"], **kw))
    piped = windows(TokenStream(f"pipe:cat {data['a']}/manifest.json", **kw))
    assert np.array_equal(local, piped)
    # A shard missing on the remote side: warned about, counted and skipped like a corrupt one.
    gone = tmp_path / "gone"
    shutil.copytree(data["a"], gone)
    (gone / "shard-000001.tar").unlink()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        shutil.copytree(data["a"], tmp_path / "a")
        assert np.array_equal(local, windows(TokenStream(f"{base}/a/manifest.json", **kw)))
        s = TokenStream(f"{base}/gone/manifest.json", **kw)
        with pytest.warns(CorruptShardWarning, match="gone/shard-000001.tar"):
            assert len(list(s)) == len(local) // 2 == len(s)
        assert s.stats()["corrupt_shards"] == 1
    finally:
        server.shutdown()
    s = TokenStream(f"pipe:cat {gone}/manifest.json", **kw)
    with pytest.warns(CorruptShardWarning, match="shard-000001.tar"):
        assert len(list(s)) == len(local) // 2
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        TokenStream("pipe:cat /nonexistent/manifest.json", **kw)


def test_lanes_mode_rows_are_contiguous_lanes_any_split_workers_and_resume(data):
    """Lanes mode (what training reads): row i of rank r is lane r*B + i, one contiguous stream; the
    same lanes whatever the ranks x rows split, with or without workers; merged lane positions of
    all ranks resume on another split."""
    S, total = 24, 6
    src = [(data["a"], 2.0), (data["b"], 1.0)]              # mixing: every lane takes the same source
    kw = dict(seed=3, shuffle_tokens=5000)
    lane_rows = []                                           # the definition: one stream of batch 1 per lane
    for lane in range(total):
        it = iter(TokenStream(src, S, 1, rank=lane, world_size=total, **kw))
        lane_rows.append([next(it)[0] for _ in range(7)])
    want = [torch.cat([lane_rows[lane][n] for lane in range(total)]) for n in range(7)]

    def global_batches(world, workers, n, states=None):
        streams = [TokenStream(src, S, total // world, rank=r, world_size=world, num_workers=workers,
                               lanes=True, **kw) for r in range(world)]
        if states is not None:
            for s in streams:
                s.load_state_dict(states)
        its = [iter(s) for s in streams]
        got = [torch.cat([next(it)[0] for it in its]) for _ in range(n)]
        merged = {}
        for s in streams:
            merged.update(s.state_dict())
        return got, merged

    one, _ = global_batches(1, 0, 7)
    assert all(torch.equal(a, b) for a, b in zip(one, want))
    split, states = global_batches(2, 2, 4)                  # 2 ranks of 3 rows, 2 workers each
    assert all(torch.equal(a, b) for a, b in zip(split, want[:4]))
    assert sorted(states) == list(range(total)) and {v["batches"] for v in states.values()} == {4}
    rest, _ = global_batches(3, 0, 3, json.loads(json.dumps(states)))   # 3 ranks, keys as JSON strings
    assert all(torch.equal(a, b) for a, b in zip(rest, want[4:]))

    other = TokenStream(src, S, 4, rank=1, world_size=2, lanes=True, **kw)   # 8 lanes: not the same run
    with pytest.raises(ValueError, match="no entry for lanes"):
        other.load_state_dict({k: v for k, v in states.items() if k < 4})
    with pytest.raises(ValueError, match="world_size changed"):
        other.load_state_dict({**states, 6: states[0], 7: states[0]})
