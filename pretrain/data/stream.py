"""TokenStream: packed, rank-partitioned, exactly resumable batches from token shards.

The corpus of one epoch is the documents of all shards, shards in a seeded per-epoch order,
each document followed by EOS: a packed stream of L = tokens + docs positions. It is cut into
windows of seq_len + 1 tokens that overlap by one (window i starts at i * seq_len), so there are
(L - 1) // seq_len windows. With P = world_size * max(1, num_workers) parts, each part takes
nb = windows // (P * B) batches of B consecutive windows, and part p = rank * W + worker owns the
contiguous windows [p * nb * B, (p + 1) * nb * B); what is left over (fewer than P * B windows)
is dropped. A batch of B consecutive windows is one contiguous run of B * seq_len + 1 tokens,
so batching is a reshape, and a part reads only the shards its token range touches.

Shuffle buffer: with shuffle_tokens K > 0 each part's token range is cut into consecutive
buffers of K tokens, and the document pieces inside a buffer (a document crossing a buffer's edge
is cut there) are emitted in an order drawn from a counter-based RNG keyed by (seed, source,
epoch, part, buffer). The tokens of a part, and so the layout above, do not change; only their
order within a buffer does.

Mixing: sources are picked batch by batch by smooth weighted round robin, whose allocation is
then shuffled within blocks of MIX_BLOCK batches by a seeded RNG (no fixed period that could
line up with gradient accumulation; after n batches each source's count is within MIX_BLOCK of
weight * n, and within one batch at block boundaries).

Position state is one number, the batches this rank has yielded; everything else (epoch, shard
order, token offset, shuffle buffer, its RNG key, mixing schedule) follows from it and the
manifests, so resume is exact, with or without DataLoader workers (see `_WorkerPart`).
state_dict() also lists each worker's derived cursor (shard, offset, buffer) for logs and checks.

Lanes (lanes=True, what training reads): every row of a batch is its own lane, one contiguous
stream through the corpus, so row i of batch n+1 continues row i of batch n. The corpus is cut into
world_size * micro_batch_size lane parts exactly as above with batches of one window (rank r's row
i reads part r * B + i), and the position is still one number, the batches yielded (one window of
every lane each). The state is kept per lane, keyed by the global lane id, so the states of all
ranks merge into one dict that resumes on any number of ranks whose lanes it covers: the trainer
gives rank r the rows r*G*M ... (r+1)*G*M - 1 of each global batch (G accumulation steps of
micro-batch M), so the global batch is the same whatever the data-parallel size and micro-batch
split. DataLoader workers each read a contiguous group of the rows; the rank stacks them.

Corrupt or truncated shards (and remote reads that fail) are reported as a CorruptShardWarning
naming the shard and counted in stats(); the part goes on with the next shard of the epoch's
order (wrapping around), so every rank still yields its full number of batches. With
on_corrupt="raise" the stream raises DataError instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from typing import Iterator

import numpy as np
import torch

from rrwkv.data_tools.errors import DataError
from rrwkv.data_tools.manifest import Manifest, load_manifest
from rrwkv.data_tools.reader import iter_shard_docs

STATE_VERSION = 2
MIX_BLOCK = 64                    # batches whose source order is shuffled together
DEFAULT_SHUFFLE_TOKENS = 1 << 22  # tokens per shuffle buffer (8 MiB of uint16 per worker)
_SHUFFLE_KEY, _MIX_KEY = 0x5348, 0x4D49   # keep the RNG streams of order, shuffle, mix apart


class CorruptShardWarning(RuntimeWarning):
    """A shard could not be read completely; the stream skipped the rest of it."""


class _Source:
    """One shard set of a (possibly mixed) stream and its layout over the parts."""

    def __init__(self, manifest: Manifest, weight: float, index: int):
        self.manifest, self.weight, self.index = manifest, float(weight), index
        self.locations = [manifest.shard_location(i) for i in range(len(manifest.shards))]
        self.dtype = np.dtype(manifest.dtype)
        self.vocab_size = manifest.vocab_size
        # Packed length of each shard: its tokens plus one EOS per document.
        self.packed = np.array([s["tokens"] + s["docs"] for s in manifest.shards], dtype=np.int64)
        self.length = int(self.packed.sum())
        self.fingerprint = hashlib.sha256(json.dumps(
            [[s["docs"], s["tokens"], s.get("sha256")] for s in manifest.shards]).encode()
        ).hexdigest()[:16]

    def layout(self, seq_len: int, batch: int, parts: int) -> int:
        """Batches per part per epoch; ValueError if the corpus is too small for one each."""
        windows = max(self.length - 1, 0) // seq_len
        nb = windows // (parts * batch)
        if nb == 0:
            raise DataError(
                f"{self.manifest.name} holds {self.length:,} packed tokens, too few for one batch "
                f"of {batch} x {seq_len} tokens for each of {parts} rank/worker part(s); use a "
                f"smaller data.seq_len or data.micro_batch_size, fewer ranks/workers, or more data")
        return nb

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, self.index, epoch]).permutation(len(self.locations))

    def packed_from(self, seed: int, epoch: int, start: int, eos: int, events: list,
                    on_corrupt: str = "skip") -> Iterator[np.ndarray]:
        """The epoch's packed stream (documents + EOS) from packed position `start` on.

        A shard that fails to read (or holds fewer tokens than the manifest says) is recorded
        in `events` as (location, message) and skipped; the stream continues with the next shard
        of the order, wrapping around, so it never runs dry before every shard has failed.
        """
        order = self.order(seed, epoch)
        ends = np.cumsum(self.packed[order])
        first = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[first]) - int(self.packed[order[first]]))
        eos_arr = np.array([eos], dtype=self.dtype)
        bad: set[int] = set()
        i = first
        while True:
            shard = int(order[i % len(order)])
            i += 1
            if shard in bad:
                if len(bad) == len(order):
                    raise DataError(f"every shard of {self.manifest.name} failed to read; check "
                                    f"the files (python -m rrwkv.data_tools verify) or the URLs")
                continue
            loc = self.locations[shard]
            end = 0
            try:
                for pos, doc in iter_shard_docs(loc, self.dtype, offset, 1):
                    if doc.size and int(doc.max()) >= self.vocab_size:
                        raise DataError(f"shard {loc} is corrupt: token id {int(doc.max())} is "
                                        f"outside the vocabulary of {self.vocab_size}")
                    piece = np.concatenate([doc, eos_arr])
                    end = pos + piece.size
                    yield piece[offset - pos:] if pos < offset else piece
                if end < self.packed[shard]:
                    raise DataError(f"shard {loc} holds fewer tokens than {self.manifest.name} "
                                    f"lists; re-make it with `python -m rrwkv.data_tools tokenize`")
            except (DataError, OSError) as e:
                if on_corrupt == "raise":
                    raise DataError(str(e)) from None
                events.append((loc, str(e)))
                bad.add(shard)
            offset = 0


class _Packer:
    """Hands out runs of n tokens from a chunk iterator, each run starting on the last of the
    previous one (windows overlap by one token)."""

    def __init__(self, chunks: Iterator[np.ndarray], where: str):
        self.chunks, self.where = chunks, where
        self.buf: list[np.ndarray] = []
        self.have = 0

    def take(self, n: int) -> np.ndarray:
        while self.have < n:
            try:
                c = next(self.chunks)
            except StopIteration:
                raise DataError(f"the shards of {self.where} hold fewer tokens than its manifest "
                                f"lists; re-make them with `python -m rrwkv.data_tools tokenize`") from None
            self.buf.append(c)
            self.have += c.size
        flat = self.buf[0] if len(self.buf) == 1 else np.concatenate(self.buf)
        self.buf = [flat[n - 1:]]
        self.have = self.buf[0].size
        return flat[:n]


def _schedule(weights: Sequence[float], seed: int, start: int = 0) -> Iterator[int]:
    """Which source each batch comes from, from batch `start` on (see the module docstring)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    credit = np.zeros_like(w)
    block = 0
    while True:
        picks = np.empty(MIX_BLOCK, dtype=np.int64)
        for i in range(MIX_BLOCK):
            credit += w
            k = int(np.argmax(credit))
            credit[k] -= 1.0
            picks[i] = k
        if (block + 1) * MIX_BLOCK > start:
            picks = np.random.default_rng([seed, _MIX_KEY, block]).permutation(picks)
            yield from (int(k) for k in picks[max(0, start - block * MIX_BLOCK):])
        block += 1


def _parse_sources(source) -> list[tuple[object, float]]:
    if isinstance(source, (str, os.PathLike, Manifest)):
        return [(source, 1.0)]
    pairs = []
    for item in source:
        try:
            src, weight = item
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"data source entry {item!r} is not a (source, weight) pair; pass a "
                             f"shard directory, a manifest.json, or a list of (source, weight)") \
                from None
        if not weight > 0:
            raise ValueError(f"data source {src} has weight {weight}; weights must be positive")
        pairs.append((src, weight))
    if not pairs:
        raise ValueError("data source list is empty; give at least one shard directory")
    return pairs


class TokenStream:
    """Batches (input_ids, labels), LongTensors (B, seq_len), from packed token shards.

    source: a shard directory, its manifest.json, a webdataset URL of a manifest.json
    (`https://host/dir/manifest.json`, `pipe:aws s3 cp s3://b/d/manifest.json -`; shards are
    read from beside it), or a list of (source, weight) to mix (batch by batch, in proportion to
    the weights; all sources must share one tokenizer).
    Over one epoch of a single source every token is yielded once across all ranks and workers,
    and every rank yields the same number of batches. max_epochs None: never ends; otherwise the
    stream ends after that many epochs (of the first source to complete them, when mixing).
    shuffle_tokens: size of the document shuffle buffer in tokens (0: documents in shard order).
    on_corrupt: "skip" (warn, count in stats(), go on with the next shard) or "raise".
    lanes: every row its own contiguous stream (see the module docstring); state_dict() is then a
    dict of lane id -> that lane's position.
    """

    def __init__(self, source, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 max_epochs: int | None = None, pin_memory: bool = False, *,
                 shuffle_tokens: int = DEFAULT_SHUFFLE_TOKENS, on_corrupt: str = "skip",
                 prefetch_factor: int | None = None, lanes: bool = False):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) "
                             f"must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0 or (max_epochs is not None and max_epochs < 1):
            raise ValueError("num_workers must be >= 0 and max_epochs None or >= 1")
        if shuffle_tokens < 0:
            raise ValueError(f"shuffle_tokens ({shuffle_tokens}) must be >= 0 (0: no shuffle)")
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt is {on_corrupt!r}; use 'skip' or 'raise'")
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.seed, self.max_epochs = int(num_workers), int(seed), max_epochs
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.shuffle_tokens, self.on_corrupt = int(shuffle_tokens), on_corrupt
        self.lanes = bool(lanes)
        if self.lanes:    # a part per row (lane), batches of one window; workers read groups of rows
            self.workers = max(1, min(self.num_workers, self.micro_batch_size))
            self.part_batch = 1
            self.parts = self.world_size * self.micro_batch_size
        else:             # a part per worker, batches of B consecutive windows
            self.workers = max(1, self.num_workers)
            self.part_batch = self.micro_batch_size
            self.parts = self.world_size * self.workers
        self.sources = [_Source(m if isinstance(m, Manifest) else load_manifest(m), w, i)
                        for i, (m, w) in enumerate(_parse_sources(source))]
        first = self.sources[0].manifest
        for s in self.sources[1:]:
            if s.manifest.data["tokenizer"]["sha256"] != first.data["tokenizer"]["sha256"]:
                raise DataError(f"{s.manifest.name} and {first.name} were made with different "
                                f"tokenizers; mix only shard sets made with the same one")
        self.vocab_size, self.eos_id = first.vocab_size, first.eos_id
        self.batches_per_part = [s.layout(self.seq_len, self.part_batch, self.parts)
                                 for s in self.sources]
        self._batches = 0  # batches this rank has yielded: the whole position state
        self._stats = {"corrupt_shards": 0, "corrupt_shard_files": [], "data_wait_s": 0.0,
                       "batches_by_source": [0] * len(self.sources)}
        self._taken: dict | None = None   # source_counts' running tally (it follows from the position)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def _part_steps(self) -> int:
        """Parts of this rank that take turns yielding its batches (1 in lanes mode: all at once)."""
        return 1 if self.lanes else self.workers

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch (of the first source, when mixing)."""
        return self.batches_per_part[0] * self._part_steps

    @property
    def epoch(self) -> int:
        """The epoch (of the first source) the next batch comes from."""
        counts = self._local_counts(self._batches // self._part_steps)
        return counts[0] // self.batches_per_part[0]

    @property
    def lane_ids(self) -> list[int]:
        """Lanes mode: the global lane of each row of this rank's batches."""
        B = self.micro_batch_size
        return list(range(self.rank * B, (self.rank + 1) * B)) if self.lanes else []

    def __len__(self) -> int:
        if self.max_epochs is None:
            raise TypeError("an endless TokenStream (max_epochs=None) has no length")
        return self._local_limit() * self._part_steps

    # ---- metrics -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters of this rank's stream since construction, for the trainer's metrics.

        batches, tokens: yielded so far (tokens = batches * B * seq_len);
        corrupt_shards: shard reads that failed and were skipped (each also warned about);
        corrupt_shard_files: the first 10 of them; batches_by_source: per mixed source;
        data_wait_s: seconds the consumer spent waiting inside next() for a batch.
        """
        out = dict(self._stats, batches=self._batches,
                   tokens=self._batches * self.tokens_per_batch)
        out["corrupt_shard_files"] = list(out["corrupt_shard_files"])
        out["batches_by_source"] = list(out["batches_by_source"])
        return out

    def source_counts(self, exclude=()) -> list[int]:
        """Batches this rank has read from each source since the start of the run (not since
        construction: they follow from the position, so a resumed stream counts on). `exclude`:
        1-based batch numbers not to count (the trainer's skipped data windows).

        The tally runs on from its last call (a moved-back position or a new excluded batch before
        it starts it over), so calling it every few batches costs a few batches' schedule."""
        n_now, exclude = self._batches, frozenset(exclude)
        if len(self.sources) == 1:
            return [n_now - sum(1 for b in exclude if 1 <= b <= n_now)]
        t = self._taken
        if t is None or t["n"] > n_now or any(b <= t["n"] for b in exclude ^ t["exclude"]):
            t = self._taken = {"n": 0, "counts": [0] * len(self.sources), "local": -1, "source": 0,
                               "schedule": _schedule([s.weight for s in self.sources], self.seed)}
        t["exclude"] = exclude
        W = self._part_steps      # batch b is the (b // W)-th of its part: the schedule's (b // W)-th pick
        for b in range(t["n"], n_now):
            if b // W != t["local"]:
                t["local"], t["source"] = b // W, next(t["schedule"])
            if b + 1 not in exclude:
                t["counts"][t["source"]] += 1
        t["n"] = n_now
        return list(t["counts"])

    def _record(self, source: int, events) -> None:
        self._batches += 1
        self._stats["batches_by_source"][source] += 1
        for loc, message in events:
            self._stats["corrupt_shards"] += 1
            if len(self._stats["corrupt_shard_files"]) < 10:
                self._stats["corrupt_shard_files"].append(loc)
            warnings.warn(f"skipped the rest of shard {loc}: {message}", CorruptShardWarning,
                          stacklevel=3)

    # ---- state ---------------------------------------------------------------------------
    def _layout_key(self) -> dict:
        """What a saved position depends on. In lanes mode, that of one lane: the layout of a stream
        of batch 1 with one rank per lane (how lanes were first written, so old positions load)."""
        if self.lanes:
            batch, world, workers = 1, self.parts, 1
        else:
            batch, world, workers = self.micro_batch_size, self.world_size, self.workers
        return {"seq_len": self.seq_len, "micro_batch_size": batch, "world_size": world,
                "workers": workers, "seed": self.seed, "shuffle_tokens": self.shuffle_tokens,
                "sources": [[s.fingerprint, s.weight] for s in self.sources]}

    def _part_cursor(self, part: int, done: int) -> list[dict]:
        """Where `part` reads next, per source, after it yielded `done` batches (for logs and checks)."""
        BS = self.part_batch * self.seq_len
        counts = self._local_counts(done)
        per_source = []
        for k, src in enumerate(self.sources):
            epoch, j = divmod(counts[k], self.batches_per_part[k])
            offset = j * BS
            begin = part * self.batches_per_part[k] * BS
            order = src.order(self.seed, epoch)
            ends = np.cumsum(src.packed[order])
            at = int(np.searchsorted(ends, begin + offset, side="right"))
            cur = {"source": k, "epoch": epoch, "part_offset": offset,
                   "shard": src.manifest.shards[int(order[at])]["file"],
                   "shard_offset": begin + offset - int(ends[at] - src.packed[order[at]])}
            if self.shuffle_tokens:
                cur["buffer"] = offset // self.shuffle_tokens
                cur["rng_key"] = [self.seed, k, epoch, part, cur["buffer"], _SHUFFLE_KEY]
            per_source.append(cur)
        return per_source

    def _cursors(self) -> list[dict]:
        """Where each logical worker of this rank reads next, per source (derived, for logs)."""
        W = self.workers
        out = []
        for w in range(W):
            done = max(0, -(-(self._batches - w) // W))
            out.append({"worker": w, "batches": done, "sources": self._part_cursor(self.rank * W + w, done)})
        return out

    def _lane_state(self, lane: int) -> dict:
        return {"version": STATE_VERSION, "batches": self._batches, "epoch": self.epoch, "rank": lane,
                "layout": self._layout_key(),
                "cursors": [{"worker": 0, "batches": self._batches,
                             "sources": self._part_cursor(lane, self._batches)}]}

    def state_dict(self) -> dict:
        """The position. In lanes mode: {lane id: that lane's position} for this rank's lanes."""
        if self.lanes:
            return {lane: self._lane_state(lane) for lane in self.lane_ids}
        return {"version": STATE_VERSION, "batches": self._batches, "epoch": self.epoch,
                "rank": self.rank, "layout": self._layout_key(), "cursors": self._cursors()}

    def _check_state(self, sd: dict, cursors) -> int:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state has version {sd.get('version')}, expected "
                             f"{STATE_VERSION}; it was saved by another version of the loader")
        mine = self._layout_key()
        diff = [k for k in mine if sd["layout"].get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"the saved data position does not fit this stream: {', '.join(diff)} changed "
                f"(saved {[sd['layout'].get(k) for k in diff]}, now {[mine[k] for k in diff]}); "
                f"resume with the same data, seq_len, batch size, world size, workers, seed "
                f"and shuffle buffer")
        if "cursors" in sd and sd["cursors"] != cursors(int(sd["batches"])):
            raise ValueError("the saved data position disagrees with the shard layout it should "
                             "follow from; the data changed since the checkpoint")
        return int(sd["batches"])

    def load_state_dict(self, sd: dict) -> None:
        """Resume at a saved position. In lanes mode `sd` maps lane ids (int or str) to positions
        and may hold other ranks' lanes too (the merged states of every rank of a checkpoint)."""
        if not self.lanes:
            self._batches = self._check_state(sd, lambda n: self._with_batches(n, self._cursors))
            return
        missing = [lane for lane in self.lane_ids if lane not in sd and str(lane) not in sd]
        if missing:
            raise ValueError(f"the saved data position has no entry for lanes {missing[:4]}: it was "
                             f"written with a different number of lanes (train.global_batch_size); "
                             f"resume with the same global batch size")
        done = set()
        for lane in self.lane_ids:
            one = sd[lane] if lane in sd else sd[str(lane)]
            done.add(self._check_state(one, lambda n, lane=lane: [
                {"worker": 0, "batches": n, "sources": self._part_cursor(lane, n)}]))
        if len(done) != 1:
            raise ValueError(f"the saved lanes are at different positions {sorted(done)[:4]}; the "
                             f"checkpoint is inconsistent")
        self._batches = done.pop()

    def _with_batches(self, n: int, fn):
        old, self._batches = self._batches, n
        try:
            return fn()
        finally:
            self._batches = old

    # ---- iteration -------------------------------------------------------------------------
    def _local_counts(self, local: int) -> list[int]:
        """Batches taken from each source after `local` batches of one part."""
        counts = [0] * len(self.sources)
        if len(self.sources) == 1:
            counts[0] = local
            return counts
        sched = _schedule([s.weight for s in self.sources], self.seed)
        for _ in range(local):
            counts[next(sched)] += 1
        return counts

    def _local_limit(self) -> int | None:
        """Batches one part yields before max_epochs ends the stream (None: never)."""
        if self.max_epochs is None:
            return None
        if len(self.sources) == 1:
            return self.max_epochs * self.batches_per_part[0]
        counts = [0] * len(self.sources)
        n = 0
        for k in _schedule([s.weight for s in self.sources], self.seed):
            if counts[k] >= self.max_epochs * self.batches_per_part[k]:
                return n
            counts[k] += 1
            n += 1

    def _part_chunks(self, k: int, epoch: int, part: int, offset: int,
                     events: list) -> Iterator[np.ndarray]:
        """Source k's tokens for `part` in `epoch`, from token `offset` of the part on."""
        src, nb = self.sources[k], self.batches_per_part[k]
        part_tokens = nb * self.part_batch * self.seq_len
        begin = part * part_tokens
        K = self.shuffle_tokens
        if not K:
            yield from src.packed_from(self.seed, epoch, begin + offset, self.eos_id, events,
                                       self.on_corrupt)
            return
        n = part_tokens + 1                       # the part's tokens, incl. the last label
        b = offset // K
        skip = offset - b * K
        chunks = src.packed_from(self.seed, epoch, begin + b * K, self.eos_id, events,
                                 self.on_corrupt)
        carry = None
        while b * K < n:
            size = min(K, n - b * K)
            pieces, have = [], 0
            while have < size:
                c = carry if carry is not None else next(chunks)
                carry = None
                if have + c.size > size:           # a document crossing the buffer's edge
                    c, carry = c[:size - have], c[size - have:]
                pieces.append(c)
                have += c.size
            rng = np.random.default_rng([self.seed, k, epoch, part, b, _SHUFFLE_KEY])
            block = np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])
            yield block[skip:]
            skip = 0
            b += 1

    def _iter_part(self, part: int, start: int):
        """(input_ids, labels, source, corrupt events) of one part (rank * W + worker), from
        its local batch index `start` on."""
        B, S = self.part_batch, self.seq_len
        limit = self._local_limit()
        counts = self._local_counts(start)
        sched = _schedule([s.weight for s in self.sources], self.seed, start)
        packers: dict[int, tuple[int, _Packer]] = {}
        events: list = []
        local = start
        while limit is None or local < limit:
            k = next(sched) if len(self.sources) > 1 else 0
            src, nb = self.sources[k], self.batches_per_part[k]
            epoch, j = divmod(counts[k], nb)
            if k not in packers or packers[k][0] != epoch:
                chunks = self._part_chunks(k, epoch, part, j * B * S, events)
                packers[k] = (epoch, _Packer(chunks, src.manifest.name))
            run = packers[k][1].take(B * S + 1)
            t = torch.from_numpy(run.astype(np.int64))
            yield t[:-1].view(B, S), t[1:].view(B, S), k, tuple(events)
            events.clear()
            counts[k] += 1
            local += 1

    def _iter_lanes(self, rows: Sequence[int], start: int):
        """Lanes mode: (input_ids, labels, source, events) of the given rows of this rank's batches,
        one window of each row's lane per batch, from batch `start` on."""
        parts = [self._iter_part(self.rank * self.micro_batch_size + i, start) for i in rows]
        while True:
            got = []
            for it in parts:
                try:
                    got.append(next(it))
                except StopIteration:
                    return
            yield _join(got)

    def _row_groups(self) -> list[range]:
        """Lanes mode: the rows each worker reads (contiguous groups, as even as possible)."""
        B, W = self.micro_batch_size, self.workers
        return [range(w * B // W, (w + 1) * B // W) for w in range(W)]

    def _batches_from(self, start: int):
        """(input_ids, labels, source, events) of this rank from its batch `start` on."""
        if self.num_workers == 0:
            if self.lanes:
                return self._iter_lanes(range(self.micro_batch_size), start)
            return self._iter_part(self.rank, start)
        kw = {} if self.prefetch_factor is None else {"prefetch_factor": self.prefetch_factor}
        dataset = _WorkerLanes(self, start) if self.lanes else _WorkerPart(self, start)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.workers if self.lanes else self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False, **kw)
        return _stack_groups(iter(loader), self.workers) if self.lanes else iter(loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = self._batches_from(self._batches)
        while True:
            t0 = time.perf_counter()
            try:
                x, y, k, events = next(it)
            except StopIteration:
                return
            if self.pin_memory and self.num_workers == 0:
                x, y = x.pin_memory(), y.pin_memory()
            self._stats["data_wait_s"] += time.perf_counter() - t0
            self._record(k, events)
            yield x, y


class _WorkerPart(torch.utils.data.IterableDataset):
    """What each DataLoader worker of one rank iterates.

    The DataLoader takes batches from its workers round robin, starting with worker 0 on every
    new iterator. The rank's n-th batch belongs to logical worker n % W (its (n // W)-th batch),
    so after `done` batches physical worker i plays logical worker (i + done) % W: the order of
    batches, and so resume, is the same as with one uninterrupted iterator.
    """

    def __init__(self, stream: TokenStream, done: int):
        self.stream, self.done = stream, done

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        W = self.stream.workers
        physical = info.id if info is not None else 0
        logical = (physical + self.done) % W
        start = max(0, -(-(self.done - logical) // W))  # batches of this worker already consumed
        return self.stream._iter_part(self.stream.rank * W + logical, start)


class _WorkerLanes(torch.utils.data.IterableDataset):
    """Lanes mode: DataLoader worker i reads row group i of every batch (from batch `start` on); the
    DataLoader hands out the workers' items round robin, so W consecutive items are one batch."""

    def __init__(self, stream: TokenStream, start: int):
        self.stream, self.start = stream, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rows = self.stream._row_groups()[info.id if info is not None else 0]
        return self.stream._iter_lanes(rows, self.start)


def _stack_groups(items: Iterator, groups: int):
    """Join each `groups` consecutive (x, y, source, events) row groups into one batch."""
    while True:
        got = []
        for _ in range(groups):
            try:
                got.append(next(items))
            except StopIteration:
                return
        yield _join(got)


def _join(got: list) -> tuple:
    """Row groups (x, y, source, events) of one batch, stacked in order."""
    return (torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got]), got[0][2],
            tuple(e for g in got for e in g[3]))
