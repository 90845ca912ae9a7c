"""Synthetic recall tasks as token ids, generated on the target device in a few vectorized ops.

Both tasks put exactly `kv_pairs` answers in every sequence, so a batch also carries the answer
positions and values as (B, K) tensors: the trainer gathers the logits there (no boolean masking,
hence no host-device synchronization per step). `labels` (-100 except at the answers) is the same
information in the usual language-model form.

- **MQAR** (multi-query associative recall, Arora et al. 2023 "Zoology", their
  `multiquery_ar` generator): the vocabulary is split into
  a key half [1, V/2) and a value half [V/2, V); K distinct keys and K distinct values are laid
  out as k1 v1 k2 v2 ... at the start; the remaining T - 2K positions form (T - 2K) / 2 slots at
  even offsets, K distinct slots are drawn with probability proportional to slot^(power_a - 1)
  (power_a = 0.01: most queries come soon after the pairs), and key i is placed in its slot.
  Every other position is token 0 (Zoology's `random_non_queries=False`, the setting of its
  figure 2, whose accuracies are this suite's anchors) or, with `random_non_queries`, a uniform
  random token of the whole vocabulary (Zoology's other setting: a harder task, where the
  model must also tell queries from look-alike noise). The label at a query position is the value paired with that key (the
  model predicts it as the next token).
  Drawing K distinct slots in proportion to weights is done with the Gumbel-top-k trick, which
  has the same distribution as numpy's sequential `choice(replace=False, p=...)`.
- **Gap** (distance-controlled recall): K key-value pairs, then G noise tokens, then the K keys
  again in a random order, each query labelled with its value. Keys, values and noise come from
  disjoint quarters/halves of the vocabulary (keys [0, V/4), values [V/4, V/2), noise [V/2, V)),
  so no noise token can look like a key. Evaluation sequences are exactly pairs + G + queries
  (3K + G tokens). Training sequences have a fixed length T: the gap is drawn uniformly from
  [0, T - 3K] per sequence and the rest of the window is noise before the pairs, so a model
  learns to recall over every distance up to its training length, not one fixed offset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE = -100
VOCAB = 8192   # Zoology's MQAR vocabulary


@dataclass
class RecallBatch:
    inputs: torch.Tensor      # (B, T) token ids
    labels: torch.Tensor      # (B, T) the answer at answer positions, IGNORE elsewhere
    positions: torch.Tensor   # (B, K) input positions whose next-token prediction is an answer
    answers: torch.Tensor     # (B, K) the answers
    gap: Optional[torch.Tensor] = None   # (B,) gap task: noise tokens between the last pair and the first query


def _distinct(batch: int, k: int, low: int, high: int, gen: torch.Generator, device) -> torch.Tensor:
    """(batch, k) ids, distinct within each row, uniform over [low, high) (top-k of uniform scores)."""
    scores = torch.rand(batch, high - low, generator=gen, device=device)
    return low + scores.topk(k, dim=1).indices


def _labels(batch: int, seq_len: int, positions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    labels = torch.full((batch, seq_len), IGNORE, dtype=torch.long, device=positions.device)
    return labels.scatter_(1, positions, answers)


def check_mqar(seq_len: int, kv_pairs: int, vocab_size: int = VOCAB) -> None:
    """Zoology's preconditions, as errors a user can read."""
    if seq_len % 2:
        raise ValueError(f"mqar: --seq-len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"mqar: the vocabulary ({vocab_size}) must exceed --seq-len ({seq_len})")
    if 4 * kv_pairs > seq_len:
        raise ValueError(f"mqar: {kv_pairs} pairs need --seq-len >= {4 * kv_pairs} (2K for the pairs, 2K query slots)")


def mqar_batch(batch: int, seq_len: int, kv_pairs: int, gen: torch.Generator, device=None,
               vocab_size: int = VOCAB, power_a: float = 0.01, random_non_queries: bool = False) -> RecallBatch:
    """A batch of Zoology MQAR sequences (see the module docstring), drawn from `gen` on `device`."""
    check_mqar(seq_len, kv_pairs, vocab_size)
    device = torch.device(device or gen.device)
    B, T, K = batch, seq_len, kv_pairs
    half = vocab_size // 2
    keys = _distinct(B, K, 1, half, gen, device)
    values = _distinct(B, K, half, vocab_size, gen, device)
    slots = (T - 2 * K) // 2
    log_w = (power_a - 1.0) * torch.log(torch.arange(1, slots + 1, device=device, dtype=torch.float32))
    u = torch.rand(B, slots, generator=gen, device=device).clamp_(min=1e-12, max=1 - 1e-7)
    chosen = (log_w - torch.log(-torch.log(u))).topk(K, dim=1).indices       # Gumbel-top-k: K distinct slots
    positions = 2 * K + 2 * chosen
    if random_non_queries:
        inputs = torch.randint(0, vocab_size, (B, T), generator=gen, device=device)
    else:
        inputs = torch.zeros(B, T, dtype=torch.long, device=device)
    inputs[:, 0:2 * K:2] = keys
    inputs[:, 1:2 * K:2] = values
    inputs.scatter_(1, positions, keys)
    return RecallBatch(inputs, _labels(B, T, positions, values), positions, values)


def gap_vocab(vocab_size: int = VOCAB):
    """(keys, values, noise) as [low, high) ranges of the gap task: disjoint parts of the vocabulary."""
    q = vocab_size // 4
    return (0, q), (q, 2 * q), (2 * q, vocab_size)


def gap_batch(batch: int, kv_pairs: int, gen: torch.Generator, device=None, gap: Optional[int] = None,
              seq_len: Optional[int] = None, vocab_size: int = VOCAB) -> RecallBatch:
    """Gap-task sequences: with `gap`, exactly pairs + `gap` noise tokens + queries (3K + gap tokens);
    with `seq_len` instead, training windows of that length whose gap is uniform in [0, seq_len - 3K]
    (noise before the pairs fills the rest)."""
    if (gap is None) == (seq_len is None):
        raise ValueError("gap_batch: give exactly one of gap (evaluation) or seq_len (training)")
    device = torch.device(device or gen.device)
    (k_lo, k_hi), (v_lo, v_hi), (n_lo, n_hi) = gap_vocab(vocab_size)
    B, K = batch, kv_pairs
    if K > k_hi - k_lo:
        raise ValueError(f"gap: {K} pairs exceed the key vocabulary ({k_hi - k_lo})")
    if gap is not None:
        if gap < 0:
            raise ValueError(f"gap: the gap must be >= 0, got {gap}")
        T = 3 * K + gap
        gaps = torch.full((B,), gap, dtype=torch.long, device=device)
    else:
        T = seq_len
        if T < 3 * K:
            raise ValueError(f"gap: --seq-len ({T}) must be at least 3 x --kv-pairs ({3 * K})")
        gaps = torch.randint(0, T - 3 * K + 1, (B,), generator=gen, device=device)
    keys = _distinct(B, K, k_lo, k_hi, gen, device)
    values = _distinct(B, K, v_lo, v_hi, gen, device)
    order = torch.rand(B, K, generator=gen, device=device).argsort(dim=1)
    inputs = torch.randint(n_lo, n_hi, (B, T), generator=gen, device=device)
    start = (T - 3 * K - gaps)[:, None]                                  # noise before the pairs
    ar = torch.arange(K, device=device)[None]
    inputs.scatter_(1, start + 2 * ar, keys)
    inputs.scatter_(1, start + 2 * ar + 1, values)
    positions = start + 2 * K + gaps[:, None] + ar
    answers = values.gather(1, order)
    inputs.scatter_(1, positions, keys.gather(1, order))
    return RecallBatch(inputs, _labels(B, T, positions, answers), positions, answers, gaps)
