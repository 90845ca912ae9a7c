"""Synthetic long-range tasks with accuracy by distance: passkey retrieval and multi-query associative recall.

Both are built from the model's own tokenizer as token sequences (pieces encoded separately and
joined, so distances are exact token counts) from a seeded generator, and scored by teacher forcing:
an answer is right when every one of its tokens is the model's argmax (what greedy decoding would
write). `answer_nll` (mean negative log-likelihood per answer token) shows progress before accuracy does.

- Passkey (Mohtashami & Jaggi 2023): a random number hidden in repetitive filler text, asked for
  at the end; `distance` = tokens from the end of the sentence holding the number to the answer.
- Multi-query associative recall (Arora et al. 2023, "Zoology"): `pairs` key-value pairs of
  single-token words ("key: value" lines), then `distance` tokens of filler, then every key asked
  again in a shuffled order, each answered before the next is asked (as in MQAR). `distance` is
  the gap between the last pair and the first query; `mean_distance` reports the actual distance
  from each pair to its query.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

from .evaluation import score_sequences

INTRO = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important info there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is "


@dataclass
class Probe:
    """One question: the answer tokens sit at tokens[start + 1 : start + 1 + len(answer)]."""
    start: int                    # input position whose next token is the answer's first
    answer: List[int]
    distance: int                 # tokens between the fact and the answer


@dataclass
class TaskSequence:
    tokens: List[int]
    probes: List[Probe] = field(default_factory=list)
    group: int = 0                # the distance setting this sequence was made for


class _Pieces:
    """Encoded text pieces of a tokenizer (cached) and filler cut to an exact token count."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.filler = tokenizer.encode(FILLER * 4)
        self._cache: Dict[str, List[int]] = {}

    def __call__(self, text: str) -> List[int]:
        if text not in self._cache:
            self._cache[text] = self.tok.encode(text)
        return self._cache[text]

    def fill(self, n: int, offset: int = 0) -> List[int]:
        f = self.filler
        return [f[(offset + i) % len(f)] for i in range(n)]


def passkey_sequences(tokenizer, distances: Sequence[int], samples: int, seed: int = 0, digits: int = 5,
                      max_depth: int = 64) -> List[TaskSequence]:
    """`samples` passkey sequences per distance; the key sentence starts after 0..max_depth filler tokens."""
    rng = random.Random(seed)
    piece = _Pieces(tokenizer)
    question = piece(QUESTION)
    out = []
    for d in distances:
        if d < len(question):
            raise ValueError(f"passkey distance {d} is shorter than the question itself ({len(question)} tokens); "
                             f"use distances >= {len(question)}")
        for _ in range(samples):
            key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
            answer = piece(key)
            before = piece.fill(rng.randint(0, max_depth), offset=rng.randrange(len(piece.filler)))
            fact = piece(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
            head = [tokenizer.eos_id] + piece(INTRO) + before + fact
            gap = piece.fill(d - len(question), offset=rng.randrange(len(piece.filler)))
            prefix = head + gap + question
            out.append(TaskSequence(prefix + answer, [Probe(len(prefix) - 1, answer, len(gap) + len(question))], d))
    return out


def word_tokens(tokenizer, limit: int = 4096) -> List[int]:
    """Ids that decode, alone, to one alphabetic word (optionally after one space): keys and values of recall."""
    words = []
    for i in range(min(tokenizer.vocab_size, 1 << 20)):
        if i == tokenizer.eos_id:
            continue
        text = tokenizer.decode([i])
        w = text[1:] if text.startswith(" ") else text
        if 2 <= len(w) <= 12 and w.isascii() and w.isalpha() and tokenizer.encode(text) == [i]:
            words.append(i)
            if len(words) >= limit:
                break
    return words


def recall_sequences(tokenizer, distances: Sequence[int], samples: int, pairs: int = 8,
                     seed: int = 0) -> List[TaskSequence]:
    """`samples` multi-query associative recall sequences per gap distance, `pairs` queries each."""
    rng = random.Random(seed + 1)
    piece = _Pieces(tokenizer)
    words = word_tokens(tokenizer)
    if len(words) < 2 * pairs:
        raise ValueError(f"the tokenizer has only {len(words)} single-token words; associative recall with "
                         f"{pairs} pairs needs {2 * pairs}")
    sep, nl = piece(": "), piece("\n")
    out = []
    for d in distances:
        for _ in range(samples):
            keys = rng.sample(words, pairs)
            values = [rng.choice(words) for _ in keys]
            tokens = [tokenizer.eos_id]
            told = {}
            for k, v in zip(keys, values):
                tokens += [k] + sep + [v] + nl
                told[k] = len(tokens) - len(nl) - 1          # where the value was written
            tokens += piece.fill(d, offset=rng.randrange(len(piece.filler))) + nl
            probes = []
            for j in rng.sample(range(pairs), pairs):
                tokens += [keys[j]] + sep
                probes.append(Probe(len(tokens) - 1, [values[j]], len(tokens) - told[keys[j]]))
                tokens += [values[j]] + nl
            out.append(TaskSequence(tokens, probes, d))
    return out


def score_tasks(model, sequences: Sequence[TaskSequence], chunk_len: int, batch_size: int = 8) -> List[Dict]:
    """Accuracy and answer NLL per distance group, in the order the groups first appear."""
    scored = score_sequences(model, [s.tokens for s in sequences], chunk_len, batch_size,
                             pad_id=sequences[0].tokens[0] if sequences else 0)
    groups: Dict[int, Dict[str, list]] = {}
    for seq, sc in zip(sequences, scored):
        g = groups.setdefault(seq.group, {"correct": [], "nll": [], "distance": []})
        for p in seq.probes:
            span = slice(p.start, p.start + len(p.answer))
            g["correct"].append(bool(sc.is_argmax[span].all()))
            g["nll"].append(float(-sc.logprob[span].mean()))
            g["distance"].append(p.distance)
    return [{"distance": d, "accuracy": float(np.mean(g["correct"])), "answer_nll": float(np.mean(g["nll"])),
             "mean_distance": float(np.mean(g["distance"])), "questions": len(g["correct"]),
             "sequences": sum(1 for s in sequences if s.group == d)}
            for d, g in groups.items()]
