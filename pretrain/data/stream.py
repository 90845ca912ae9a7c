"""TokenStream: packed, rank-partitioned, exactly resumable batches from token shards.

The corpus of one epoch is the documents of all shards, shards in a seeded per-epoch order,
each document followed by EOS: a packed stream of L = tokens + docs positions. It is cut into
windows of seq_len + 1 tokens that overlap by one (window i starts at i * seq_len), so there are
(L - 1) // seq_len windows. With P = world_size * max(1, num_workers) parts, each part takes
nb = windows // (P * B) batches of B consecutive windows, and part p = rank * W + worker owns the
contiguous windows [p * nb * B, (p + 1) * nb * B); what is left over (fewer than P * B windows)
is dropped. A batch of B consecutive windows is one contiguous run of B * seq_len + 1 tokens,
so batching is a reshape, and a part reads only the shards its token range touches.

Position state is one number, the batches this rank has yielded; everything else (epoch, shard
order, token offset) follows from it and the manifests, so state_dict() is tiny and resume is
exact, with or without DataLoader workers (see `_WorkerPart`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.manifest import Manifest, load_manifest
from data_tools.reader import iter_shard_docs

STATE_VERSION = 1


class _Source:
    """One shard set of a (possibly mixed) stream and its layout over the parts."""

    def __init__(self, manifest: Manifest, weight: float, index: int):
        self.manifest, self.weight, self.index = manifest, float(weight), index
        self.paths = [manifest.shard_path(i) for i in range(len(manifest.shards))]
        self.dtype = np.dtype(manifest.dtype)
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
                f"{self.manifest.path} holds {self.length:,} packed tokens, too few for one batch "
                f"of {batch} x {seq_len} tokens for each of {parts} rank/worker part(s); use a "
                f"smaller data.seq_len or data.micro_batch_size, fewer ranks/workers, or more data")
        return nb

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, self.index, epoch]).permutation(len(self.paths))

    def packed_from(self, seed: int, epoch: int, start: int, eos: int) -> Iterator[np.ndarray]:
        """The epoch's packed stream (documents + EOS) from packed position `start` on."""
        order = self.order(seed, epoch)
        ends = np.cumsum(self.packed[order])
        first = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[first]) - int(self.packed[order[first]]))
        eos_arr = np.array([eos], dtype=self.dtype)
        for shard in order[first:]:
            for pos, doc in iter_shard_docs(self.paths[shard], self.dtype, offset, 1):
                piece = np.concatenate([doc, eos_arr])
                yield piece[offset - pos:] if pos < offset else piece
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
                                f"lists; re-make them with `python -m data_tools tokenize`") from None
            self.buf.append(c)
            self.have += c.size
        flat = self.buf[0] if len(self.buf) == 1 else np.concatenate(self.buf)
        self.buf = [flat[n - 1:]]
        self.have = self.buf[0].size
        return flat[:n]


def _schedule(weights: Sequence[float]) -> Iterator[int]:
    """Which source each batch comes from: smooth weighted round robin (deterministic; after
    n batches every source's share is within one batch of weight * n)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    credit = np.zeros_like(w)
    while True:
        credit += w
        k = int(np.argmax(credit))
        credit[k] -= 1.0
        yield k


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

    source: a shard directory, its manifest.json, or a list of (source, weight) to mix (batch by
    batch, in proportion to the weights; all sources must share one tokenizer).
    Over one epoch of a single source every token is yielded once across all ranks and workers,
    and every rank yields the same number of batches. max_epochs None: never ends; otherwise the
    stream ends after that many epochs (of the first source to complete them, when mixing).
    """

    def __init__(self, source, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 max_epochs: int | None = None, pin_memory: bool = False):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) "
                             f"must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0 or (max_epochs is not None and max_epochs < 1):
            raise ValueError("num_workers must be >= 0 and max_epochs None or >= 1")
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.seed, self.max_epochs = int(num_workers), int(seed), max_epochs
        self.pin_memory = pin_memory
        self.workers = max(1, self.num_workers)      # parts per rank
        self.parts = self.world_size * self.workers
        self.sources = [_Source(m if isinstance(m, Manifest) else load_manifest(m), w, i)
                        for i, (m, w) in enumerate(_parse_sources(source))]
        first = self.sources[0].manifest
        for s in self.sources[1:]:
            if s.manifest.data["tokenizer"]["sha256"] != first.data["tokenizer"]["sha256"]:
                raise DataError(f"{s.manifest.path} and {first.path} were made with different "
                                f"tokenizers; mix only shard sets made with the same one")
        self.vocab_size, self.eos_id = first.vocab_size, first.eos_id
        self.batches_per_part = [s.layout(self.seq_len, self.micro_batch_size, self.parts)
                                 for s in self.sources]
        self._batches = 0  # batches this rank has yielded: the whole position state

    # ---- sizes -------------------------------------------------------------------------
    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch (of the first source, when mixing)."""
        return self.batches_per_part[0] * self.workers

    @property
    def epoch(self) -> int:
        """The epoch (of the first source) the next batch comes from."""
        counts = self._local_counts(self._batches // self.workers)
        return counts[0] // self.batches_per_part[0]

    def __len__(self) -> int:
        if self.max_epochs is None:
            raise TypeError("an endless TokenStream (max_epochs=None) has no length")
        return self._local_limit() * self.workers

    # ---- state ---------------------------------------------------------------------------
    def _layout_key(self) -> dict:
        return {"seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
                "world_size": self.world_size, "workers": self.workers, "seed": self.seed,
                "sources": [[s.fingerprint, s.weight] for s in self.sources]}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "batches": self._batches, "epoch": self.epoch,
                "rank": self.rank, "layout": self._layout_key()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state has version {sd.get('version')}, expected "
                             f"{STATE_VERSION}; it was saved by another version of the loader")
        mine = self._layout_key()
        diff = [k for k in mine if sd["layout"].get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"the saved data position does not fit this stream: {', '.join(diff)} changed "
                f"(saved {[sd['layout'].get(k) for k in diff]}, now {[mine[k] for k in diff]}); "
                f"resume with the same data, seq_len, batch size, world size, workers and seed")
        self._batches = int(sd["batches"])

    # ---- iteration -------------------------------------------------------------------------
    def _local_counts(self, local: int) -> list[int]:
        """Batches taken from each source after `local` batches of one part."""
        counts = [0] * len(self.sources)
        if len(self.sources) == 1:
            counts[0] = local
            return counts
        sched = _schedule([s.weight for s in self.sources])
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
        for k in _schedule([s.weight for s in self.sources]):
            if counts[k] >= self.max_epochs * self.batches_per_part[k]:
                return n
            counts[k] += 1
            n += 1

    def _iter_part(self, part: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of one part (rank * W + worker), from its local batch index `start` on."""
        B, S = self.micro_batch_size, self.seq_len
        limit = self._local_limit()
        counts = self._local_counts(start)
        sched = _schedule([s.weight for s in self.sources])
        for _ in range(start):
            next(sched)
        packers: dict[int, tuple[int, _Packer]] = {}
        local = start
        while limit is None or local < limit:
            k = next(sched) if len(self.sources) > 1 else 0
            src, nb = self.sources[k], self.batches_per_part[k]
            epoch, j = divmod(counts[k], nb)
            if k not in packers or packers[k][0] != epoch:
                begin = (part * nb + j) * B * S
                chunks = src.packed_from(self.seed, epoch, begin, self.eos_id)
                packers[k] = (epoch, _Packer(chunks, str(src.manifest.path)))
            run = packers[k][1].take(B * S + 1)
            t = torch.from_numpy(run.astype(np.int64))
            if self.pin_memory:
                t = t.pin_memory()
            yield t[:-1].view(B, S), t[1:].view(B, S)
            counts[k] += 1
            local += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0:
            for batch in self._iter_part(self.rank, self._batches):
                self._batches += 1
                yield batch
            return
        loader = torch.utils.data.DataLoader(
            _WorkerPart(self, self._batches), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False)
        for batch in loader:
            self._batches += 1
            yield batch


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
