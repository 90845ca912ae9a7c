"""Held-out loss of an exported model: overall, and by position within the document.

Every document is its own sequence, started as in training after an end-of-document token:
inputs [EOS, d_0, ..., d_{n-1}], targets [d_0, ..., d_{n-1}, EOS]; the target d_i is at position i.
Sequences run through the chunked mode with the state carried from chunk to chunk, so documents of
any length are evaluated at constant memory, however long the training context was.

loss_by_position: the mean loss of the targets at positions [lo, hi) over the documents that reach
hi (n >= hi), so each bucket averages whole spans of long-enough documents; buckets 0-256, 256-1k,
1k-4k, 4k-16k, ... (each 4x the last) up to the longest document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Scored:
    """Per target of one sequence: log-probability (float64) and whether it was the argmax."""
    logprob: np.ndarray
    is_argmax: np.ndarray


@torch.no_grad()
def score_sequences(model, sequences: Sequence[Sequence[int]], chunk_len: int, batch_size: int = 8,
                    pad_id: int = 0) -> List[Scored]:
    """For each token sequence s: log p(s[t+1] | s[:t+1]) and argmax hits for t = 0 .. len(s)-2.

    Sequences are batched longest first and right-padded (padding comes after every real token, so
    in a causal model it changes nothing before it); each batch runs in chunks of `chunk_len`
    positions with the recurrent state carried, and rows leave the batch once their sequence ended.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: List[Optional[Scored]] = [None] * len(sequences)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = len(sequences[idx[0]]) - 1
        if T < 1:
            raise ValueError("every sequence needs at least two tokens (an input and a target)")
        batch = torch.full((len(idx), T + 1), pad_id, dtype=torch.long)
        for r, i in enumerate(idx):
            batch[r, :len(sequences[i])] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
        logprob = torch.empty(len(idx), T, dtype=torch.float64)
        hits = torch.empty(len(idx), T, dtype=torch.bool)
        lengths = [len(sequences[i]) - 1 for i in idx]       # descending
        state, running = None, len(idx)
        for start in range(0, T, chunk_len):
            end = min(T, start + chunk_len)
            rows = sum(1 for n in lengths if n > start)         # a prefix of the batch
            if rows < running:
                state, running = first_rows(state, rows), rows
            x = batch[:rows, start:end].to(device)
            y = batch[:rows, start + 1:end + 1].to(device)
            logits, state = model(x, state, return_state=True)
            logits = logits if logits.dtype == torch.float64 else logits.float()
            lp = -F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
            logprob[:rows, start:end] = lp.double().cpu()
            hits[:rows, start:end] = (logits.argmax(-1) == y).cpu()
        for r, i in enumerate(idx):
            n = len(sequences[i]) - 1
            out[i] = Scored(logprob[r, :n].numpy().copy(), hits[r, :n].numpy().copy())
    return out  # type: ignore[return-value]


def first_rows(state, rows: int):
    """The recurrent state of the first `rows` sequences of a batch."""
    from .model import LayerState, RRWKVState
    cut = lambda t: None if t is None else t[:rows]  # noqa: E731
    return RRWKVState([LayerState(cut(l.att_x), cut(l.ffn_x), l.wkv.select(slice(0, rows)), cut(l.att_sum),
                                  cut(l.ffn_sum), cut(l.gate)) for l in state.layers])


def bucket_edges(longest: int, first: int = 256, factor: int = 4) -> List[int]:
    """0, 256, 1024, 4096, ... up to the first edge >= longest."""
    edges = [0, first]
    while edges[-1] < longest:
        edges.append(edges[-1] * factor)
    return edges


def bucket_label(lo: int, hi: int) -> str:
    def k(n):
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"{k(lo)}-{k(hi)}"


def losses_by_position(doc_losses: Sequence[np.ndarray], edges: Sequence[int]) -> List[Dict]:
    """Buckets [edges[i], edges[i+1]): mean loss over documents whose tokens reach the bucket's end.

    doc_losses[d][i] is the loss of document d's target at position i (the last entry, at position n,
    is its closing EOS). A bucket with no document long enough is left out.
    """
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        spans = [l[lo:hi] for l in doc_losses if len(l) - 1 >= hi]
        if not spans:
            continue
        total = float(np.sum([s.sum() for s in spans]))
        tokens = sum(len(s) for s in spans)
        rows.append({"bucket": bucket_label(lo, hi), "start": lo, "end": hi, "loss": total / tokens,
                     "perplexity": perplexity(total / tokens), "tokens": tokens, "documents": len(spans)})
    return rows


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def iter_documents(source, max_docs: Optional[int] = None, max_tokens: Optional[int] = None
                   ) -> Iterator[np.ndarray]:
    """Documents of a shard directory in manifest order, until max_docs or max_tokens (summed lengths)."""
    from rrwkv.data_tools.reader import iter_shard_docs

    from .data import load_manifest
    m = load_manifest(source)
    n_docs = n_tokens = 0
    for i in range(len(m.shards)):
        for _, tokens in iter_shard_docs(m.shard_path(i), np.dtype(m.dtype)):
            if (max_docs is not None and n_docs >= max_docs) or (max_tokens is not None and n_tokens >= max_tokens):
                return
            n_docs += 1
            n_tokens += len(tokens)
            yield np.asarray(tokens, dtype=np.int64)


def document_losses(model, docs: Sequence[np.ndarray], eos_id: int, chunk_len: int,
                    batch_size: int = 8) -> List[np.ndarray]:
    """Per document: the loss (nats) of each target d_0 .. d_{n-1}, EOS, each started fresh after EOS."""
    seqs = [[eos_id, *d.tolist(), eos_id] for d in docs]
    return [-s.logprob for s in score_sequences(model, seqs, chunk_len, batch_size, pad_id=eos_id)]


def loss_report(doc_losses: Sequence[np.ndarray], edges: Optional[Sequence[int]] = None) -> Dict:
    """`loss`, `perplexity`, `tokens`, `documents` and `loss_by_position` of per-document losses."""
    if not doc_losses:
        raise ValueError("no documents to evaluate")
    total = float(np.sum([l.sum() for l in doc_losses]))
    tokens = int(sum(len(l) for l in doc_losses))
    longest = max(len(l) - 1 for l in doc_losses)
    edges = list(edges) if edges else bucket_edges(longest)
    return {"loss": total / tokens, "perplexity": perplexity(total / tokens), "tokens": tokens,
            "documents": len(doc_losses), "longest_document": longest,
            "loss_by_position": losses_by_position(doc_losses, edges)}


def training_windows(source, seq_len: int, micro_batch: int, batches: int, rank: int = 0, world_size: int = 1,
                     num_workers: int = 0):
    """The first `batches` (input_ids, labels) batches of `source` as validation inside training reads
    them (data.valid, data.seq_len, data.micro_batch_size, train.eval_batches; one data-parallel rank's
    part): windows of seq_len tokens cut from the documents packed end to end (EOS between them), so a
    window mostly starts inside a document, and each is scored from a zero state."""
    import itertools

    from .data import TokenStream
    stream = TokenStream(source, seq_len, micro_batch, rank=rank, world_size=world_size, num_workers=num_workers,
                         seed=0, max_epochs=1)
    return itertools.islice(iter(stream), batches)


@torch.no_grad()
def window_loss(model, batches) -> Dict:
    """The validation loss training logs (val_loss), from a MODEL_DIR's model: the mean over batches of
    each batch's mean next-token cross-entropy, every window from a zero state (no carried state)."""
    device = next(model.parameters()).device
    losses, tokens = [], 0
    for input_ids, labels in batches:
        logits = model(input_ids.to(device)).float()
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1)).item())
        tokens += labels.numel()
    if not losses:
        raise ValueError("the data holds no full window of this length")
    loss = float(np.mean(losses))
    return {"loss": loss, "perplexity": perplexity(loss), "batches": len(losses), "tokens": tokens}


def check_data_tokenizer(source, tokenizer_path: Path, vocab_size: int):
    """The shards must come from the model's tokenizer (same file) and fit its vocabulary."""
    from .data import check_tokenizer, load_manifest
    return check_tokenizer(load_manifest(source), tokenizer_path, vocab_size=vocab_size)


def parse_int_list(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{name} takes comma-separated non-negative integers, got {text!r}")
    return values


def edges_from_arg(text: Optional[str]) -> Optional[List[int]]:
    if not text:
        return None
    edges = parse_int_list(text, "--buckets")
    if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--buckets must start at 0 and increase, got {text!r}")
    return edges
