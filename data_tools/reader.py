"""Reading documents back out of a token shard, skipping the ones before a position cheaply.

A shard is an uncompressed tar whose members are `<key>.npy` 1-D arrays. Tar headers give each
member's byte offset and size, and the npy header's length is in its first 10 bytes, so a
document's token count is known from two small reads; documents before a skip offset are never
read in full. Used by `inspect`, `verify` and by pretrain.data's TokenStream.

Remote shards (webdataset URLs: `pipe:CMD`, `http(s)://...`) cannot be entered in the middle;
they are streamed through webdataset's gopen and tar iterator, and skipped documents are read
and dropped.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError
from .manifest import is_url

NPY_MAGIC = b"\x93NUMPY"


def _corrupt(path, what: str) -> DataError:
    return DataError(f"shard {path} is corrupt or truncated ({what}); copy it again or re-make "
                     f"the shard set with `python -m rrwkv.data_tools tokenize`")


def iter_shard_docs(path: str | Path, dtype: np.dtype, skip_tokens: int = 0,
                    tokens_per_doc_extra: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position, tokens) of each document in tar order, from the first not wholly skipped.

    Positions count the packed stream of this shard: each document takes its length plus
    `tokens_per_doc_extra` (1 when the loader appends EOS). Documents that end at or before
    `skip_tokens` are skipped without reading their data; the first yielded one may start before.
    """
    if is_url(str(path)):
        yield from _iter_remote_docs(str(path), dtype, skip_tokens, tokens_per_doc_extra)
        return
    itemsize = np.dtype(dtype).itemsize
    pos = 0
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"shard {path} not found; copy the whole shard directory or "
                                    f"re-make it with `python -m rrwkv.data_tools tokenize`") from None
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


def _iter_remote_docs(url: str, dtype, skip_tokens: int, extra: int):
    from webdataset.gopen import gopen
    from webdataset.tariterators import tar_file_iterator

    pos = 0
    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as e:
        raise _corrupt(url, f"cannot open: {e}") from None
    try:
        for sample in tar_file_iterator(stream):
            if not sample["fname"].endswith(".npy"):
                continue
            try:
                doc = np.load(io.BytesIO(sample["data"]), allow_pickle=False)
            except ValueError as e:
                raise _corrupt(url, f"member {sample['fname']} is not an npy array: {e}") from None
            if doc.dtype != dtype or doc.ndim != 1:
                raise _corrupt(url, f"member {sample['fname']} is {doc.dtype} {doc.shape}, "
                                    f"expected 1-D {np.dtype(dtype)}")
            n = doc.size + extra
            if pos + n > skip_tokens:
                yield pos, doc
            pos += n
        stream.close()  # a pipe's exit status is checked here
    except DataError:
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise _corrupt(url, str(e).split(" @ ")[0]) from None
    finally:
        try:
            stream.close()
        except Exception:  # already reported above, or a second close
            pass
