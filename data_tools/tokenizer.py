"""Tokenizers with an exact text round trip: training a sentencepiece BPE, loading sp or HF ones.

decode(encode(text)) == text for any UTF-8 text: the trained model uses no normalization, no
dummy prefix and no whitespace folding, and byte fallback covers every character it has no
piece for. sentencepiece's BPE trainer insists on marking spaces with U+2581 ("▁"), so a literal
U+2581 in the text would come back as a space; `Tokenizer.encode` spells that one character as
its three UTF-8 byte pieces instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import DataError
from .manifest import output_dir

SPACE_MARK = "\u2581"
# Text longer than this is cut into line groups for tokenizer training; sentencepiece's trainer
# drops sentences longer than its max_sentence_length (bytes).
TRAIN_SENTENCE_CHARS = 4000
TRAIN_MAX_SENTENCE_BYTES = 16384
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Text <-> token ids for a sentencepiece `.model` or a Hugging Face `tokenizer.json`.

    Attributes: path, kind ("sentencepiece" | "hf"), vocab_size, eos_id, sha256.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"tokenizer {self.path} is a directory; pass the sentencepiece .model "
                            f"or Hugging Face tokenizer.json file in it")
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer {self.path} not found: pass a sentencepiece .model (make one with "
                f"`python -m rrwkv.data_tools train-tokenizer`) or a Hugging Face tokenizer.json")
        self.sha256 = file_sha256(self.path)
        if self.path.suffix == ".json":
            self._load_hf(eos_token)
        else:
            self._load_sentencepiece(eos_token)

    def _load_sentencepiece(self, eos_token):
        import sentencepiece as spm

        self.kind = "sentencepiece"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model ({e}); "
                            f"pass a .model file or a Hugging Face tokenizer.json") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.piece_to_id(eos_token) if eos_token else self._sp.eos_id()
        if self.eos_id < 0 or (eos_token and self._sp.id_to_piece(self.eos_id) != eos_token):
            raise DataError(f"tokenizer {self.path} defines no end-of-document token; "
                            f"name one with --eos-token")
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        self._mark_ids = byte_ids if all(self._sp.is_byte(i) for i in byte_ids) else None

    def _load_hf(self, eos_token):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise DataError(f"tokenizer {self.path} is a Hugging Face tokenizer.json, which needs "
                            f"the `tokenizers` package: pip install 'rrwkv-pretrain[hf]'") from None
        self.kind = "hf"
        try:
            self._hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise DataError(f"tokenizer {self.path} could not be read as a Hugging Face "
                            f"tokenizer.json ({e})") from None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        names = [eos_token] if eos_token else HF_EOS_CANDIDATES
        ids = [self._hf.token_to_id(n) for n in names]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise DataError(f"tokenizer {self.path} has none of the usual end-of-document tokens "
                            f"{HF_EOS_CANDIDATES}; name one with --eos-token")
        self.eos_id = ids[0]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text; `num_threads` 1 keeps one core per worker process."""
        if self.kind == "hf":
            return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        out = self._sp.encode(list(texts), num_threads=num_threads)
        if self._mark_ids is not None:
            for i, text in enumerate(texts):
                if SPACE_MARK in text:
                    out[i] = self._encode_with_marks(text)
        return out

    def _encode_with_marks(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids.extend(self._mark_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; EOS and other control tokens decode to nothing."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
    """Load a sentencepiece `.model` or a Hugging Face `tokenizer.json`."""
    return Tokenizer(path, eos_token=eos_token)


def _training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Cut documents into groups of whole lines (newlines kept) short enough for the trainer."""
    for doc in documents:
        if len(doc) <= TRAIN_SENTENCE_CHARS:
            yield doc
            continue
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            if size + len(line) > TRAIN_SENTENCE_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            # A single overlong line is cut into pieces so that none is dropped by the trainer.
            while len(line) > TRAIN_SENTENCE_CHARS:
                yield line[:TRAIN_SENTENCE_CHARS]
                line = line[TRAIN_SENTENCE_CHARS:]
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def sample_documents(documents: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """A uniform random sample of n documents of a stream of any length, in one pass with n in memory
    (reservoir sampling; seeded, so the same inputs give the same sample), in stream order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, doc in enumerate(documents):
        if i < n:
            reservoir.append((i, doc))
        else:
            j = rng.randrange(i + 1)
            if j < n:
                reservoir[j] = (i, doc)
    return [doc for _, doc in sorted(reservoir)]


def train_sentencepiece(documents: Iterable[str], vocab_size: int, output_prefix: str | os.PathLike,
                        *, model_type: str = "bpe", split_digits: bool = True,
                        character_coverage: float = 0.9995, num_threads: int | None = None,
                        user_defined_symbols: Sequence[str] = (),
                        record: dict | None = None) -> Path:
    """Train a byte-fallback sentencepiece model from an iterator of documents.

    Writes PREFIX.model and PREFIX.json (the settings, for the record) and returns the model path.
    Ids: 0 <unk>, 1 <s> (unused by the loader), 2 </s> = EOS, then bytes and merges.
    """
    import sentencepiece as spm

    if vocab_size < 256 + 3 + 1:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone takes 259 "
                        f"ids; use at least 260 (e.g. 2048 or 32000)")
    prefix = Path(output_prefix)
    output_dir(prefix.parent)
    settings = dict(
        model_type=model_type, vocab_size=vocab_size, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=split_digits, character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=TRAIN_MAX_SENTENCE_BYTES,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=num_threads or min(os.cpu_count() or 1, 16),
    )
    counted = {"sentences": 0, "chars": 0}

    def sentences():
        for s in _training_sentences(documents):
            counted["sentences"] += 1
            counted["chars"] += len(s)
            yield s

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model,
                                       minloglevel=2, **settings)
    except RuntimeError as e:
        if counted["sentences"] == 0:
            raise DataError("tokenizer training got no text: the inputs hold no non-empty "
                            "documents") from None
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece vocabulary from "
                        f"{counted['chars']:,} characters ({e}); change --vocab-size as it says, "
                        f"or give more text") from None
    model_path = prefix.with_name(prefix.name + ".model")
    _write_atomic(model_path, model.getvalue())
    info = {"trainer": "sentencepiece", "sentencepiece_version": spm.__version__,
            "settings": {k: v for k, v in settings.items() if k != "num_threads"},
            "eos_id": 2, "eos_piece": "</s>", "training_sentences": counted["sentences"],
            "training_chars": counted["chars"], "sha256": file_sha256(model_path),
            **(record or {})}
    _write_atomic(prefix.with_name(prefix.name + ".json"),
                  (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return model_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
