"""Reading documents back out of a token shard, skipping the ones before a position cheaply.

A shard is an uncompressed tar whose members are `<key>.npy` 1-D arrays. Tar headers give each
member's byte offset and size, and the npy header's length is in its first 10 bytes, so a
document's token count is known from two small reads; documents before a skip offset are never
read in full. Used by `inspect` and by pretrain.data's TokenStream.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError

NPY_MAGIC = b"\x93NUMPY"


def _corrupt(path, what: str) -> DataError:
    return DataError(f"shard {path} is corrupt or truncated ({what}); copy it again or re-make "
                     f"the shard set with `python -m data_tools tokenize`")


def iter_shard_docs(path: str | Path, dtype: np.dtype, skip_tokens: int = 0,
                    tokens_per_doc_extra: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position, tokens) of each document in tar order, from the first not wholly skipped.

    Positions count the packed stream of this shard: each document takes its length plus
    `tokens_per_doc_extra` (1 when the loader appends EOS). Documents that end at or before
    `skip_tokens` are skipped without reading their data; the first yielded one may start before.
    """
    itemsize = np.dtype(dtype).itemsize
    pos = 0
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"shard {path} not found; copy the whole shard directory or "
                                    f"re-make it with `python -m data_tools tokenize`") from None
        raise _corrupt(path, str(e)) from None
    with tf:
        f = tf.fileobj
        try:
            for member in tf:
                if not member.isfile() or not member.name.endswith(".npy"):
                    continue
                f.seek(member.offset_data)
                head = f.read(10)
                if len(head) < 10 or head[:6] != NPY_MAGIC:
                    raise _corrupt(path, f"member {member.name} is not an npy array")
                if head[6] == 1:
                    hlen = 10 + int.from_bytes(head[8:10], "little")
                else:  # npy format 2/3 spell the header length in 4 bytes
                    hlen = 12 + int.from_bytes(head[8:10] + f.read(2), "little")
                n = (member.size - hlen) // itemsize
                if pos + n + tokens_per_doc_extra <= skip_tokens:
                    pos += n + tokens_per_doc_extra
                    continue
                f.seek(member.offset_data + hlen)
                data = f.read(n * itemsize)
                if len(data) != n * itemsize:
                    raise _corrupt(path, f"member {member.name} is cut short")
                yield pos, np.frombuffer(data, dtype=dtype)
                pos += n + tokens_per_doc_extra
        except tarfile.TarError as e:
            raise _corrupt(path, str(e)) from None
