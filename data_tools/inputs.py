"""Input documents: finding input files, cutting them into deterministic work units, reading them.

A work unit is a piece of the input that one worker tokenizes into its own shards: a group of
whole .txt files, a byte range of an uncompressed .jsonl (cut at line starts), one whole
compressed .jsonl.gz/.jsonl.zst, or a run of row groups of a .parquet file (pyarrow, the
`parquet` extra). Units depend only on the input files and `unit_bytes`, never on
the number of workers, so any worker count writes the same shards.

A compressed file that ends early or is corrupt is read up to the damage; the report says so
and how far it got (`--strict` makes it an error).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

try:                    # a dependency, needed only for .zst inputs: the trainer imports this module too
    import zstandard
except ImportError:     # an environment without it still reads .txt, .jsonl, .gz and parquet
    zstandard = None

from .errors import DataError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
MAX_EXAMPLES = 10  # skipped records whose file:line is kept for the report, per input file

# Why a record was skipped; `empty` is normal data, the others are malformed input (--strict).
# `damaged` counts files, not records: compressed input that ends early or is corrupt.
SKIP_REASONS = {
    "empty": "empty document",
    "invalid_json": "not valid JSON",
    "missing_field": "no string field {key!r}",
    "invalid_utf8": "not valid UTF-8",
    "damaged": "compressed input file(s) cut short or corrupt (read up to the damage)",
}
# What reading a damaged .gz / .zst raises (gzip: EOFError when cut short, like _ZstdFrames).
DAMAGE_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error) + ((zstandard.ZstdError,) if zstandard else ())


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _parquet_file(path):
    """pyarrow's ParquetFile of `path`; DataError naming the file if it is no readable parquet."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("parquet input needs pyarrow: pip install 'rrwkv-pretrain[parquet]'") \
            from None
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} is not a readable parquet file ({_first_line(e)}); replace it "
                        f"or leave it out of --input") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def expand_inputs(paths) -> list[Path]:
    """Input files, sorted; directories are searched recursively for supported files, and
    glob patterns (`data/*.jsonl.zst`, `data/**/*.parquet`) expanded to the supported files
    they match."""
    files: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists() and glob.has_magic(str(p)):
            matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
            found = [f for m in matches for f in ([m] if m.is_file() else m.rglob("*"))
                     if f.is_file() and input_kind(f)]
            if not found:
                raise FileNotFoundError(f"input pattern {p} matches no {'/'.join(SUPPORTED)} "
                                        f"files; check the pattern given to --input")
            files.update(found)
        elif p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file() and input_kind(f)]
            if not found:
                raise DataError(f"input directory {p} holds no {'/'.join(SUPPORTED)} files")
            files.update(found)
        elif p.is_file():
            if input_kind(p) is None:
                raise DataError(f"input {p} has an unsupported type: use .txt (one document "
                                f"per file), .jsonl / .jsonl.gz / .jsonl.zst or .parquet")
            files.add(p)
        else:
            raise FileNotFoundError(f"input {p} not found: check the path given to --input")
    if not files:
        raise DataError("no input files given: pass them with --input")
    return sorted(files)


@dataclass(frozen=True)
class WorkUnit:
    """One worker's share of the input: `files` (whole) or one file's bytes [start, end)
    (for parquet: row groups [start, end))."""
    index: int
    kind: str                     # "txt" | "jsonl" | "parquet"
    files: tuple[str, ...]
    start: int = 0
    end: int | None = None        # None: to the end of the file

    def describe(self) -> str:
        if self.kind == "txt":
            return f"{len(self.files)} text file(s) from {self.files[0]}"
        if self.kind == "parquet":
            return f"{self.files[0]} row groups {self.start}..{self.end}"
        return f"{self.files[0]} bytes {self.start}..{'end' if self.end is None else self.end}"


def plan_units(files: list[Path], unit_bytes: int) -> list[WorkUnit]:
    """Cut the (sorted) input files into work units of about `unit_bytes` each."""
    units: list[WorkUnit] = []
    txt_group: list[str] = []
    txt_bytes = 0

    def flush_txt():
        nonlocal txt_group, txt_bytes
        if txt_group:
            units.append(WorkUnit(len(units), "txt", tuple(txt_group)))
            txt_group, txt_bytes = [], 0

    for f in files:
        size = f.stat().st_size
        if input_kind(f) == "txt":
            if txt_bytes and txt_bytes + size > unit_bytes:
                flush_txt()
            txt_group.append(str(f))
            txt_bytes += size
            continue
        flush_txt()
        if input_kind(f) == "parquet":
            units += _parquet_units(f, unit_bytes, len(units))
        elif f.name.lower().endswith(".jsonl") and size > unit_bytes:
            for start in range(0, size, unit_bytes):
                end = min(start + unit_bytes, size)
                units.append(WorkUnit(len(units), "jsonl", (str(f),), start, end))
        else:  # compressed streams cannot be entered in the middle
            units.append(WorkUnit(len(units), "jsonl", (str(f),)))
    flush_txt()
    return units


def _parquet_units(f: Path, unit_bytes: int, first: int) -> list[WorkUnit]:
    meta = _parquet_file(f).metadata
    units, lo, size = [], 0, 0
    for rg in range(meta.num_row_groups):
        size += meta.row_group(rg).total_byte_size
        if size >= unit_bytes or rg == meta.num_row_groups - 1:
            units.append(WorkUnit(first + len(units), "parquet", (str(f),), lo, rg + 1))
            lo, size = rg + 1, 0
    return units


def unit_input_bytes(unit: WorkUnit) -> int:
    """Input bytes a unit covers (for progress: MB/s and ETA)."""
    if unit.kind == "txt":
        return sum(os.path.getsize(f) for f in unit.files)
    if unit.kind == "parquet":
        meta = _parquet_file(unit.files[0]).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(unit.start, unit.end))
    end = os.path.getsize(unit.files[0]) if unit.end is None else unit.end
    return end - unit.start


@dataclass
class FileReport:
    """Counts for one input file (or one unit's part of it); lines are relative to `first_line`."""
    path: str
    docs_read: int = 0
    docs_written: int = 0
    lines: int = 0                       # lines this unit read (to number lines across units)
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)   # [(line, reason)]
    damaged: str = ""                    # how a compressed file is damaged, what was not read

    def skip(self, reason: str, line: int, detail: str = "", key: str = "text") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            what = SKIP_REASONS[reason].format(key=key)
            self.examples.append((line, what + (f" ({detail})" if detail else "")))

    def to_json(self) -> dict:
        return {"path": self.path, "docs_read": self.docs_read, "docs_written": self.docs_written,
                "lines": self.lines, "skipped": dict(sorted(self.skipped.items())),
                "examples": [list(e) for e in self.examples], "damaged": self.damaged}

    @classmethod
    def from_json(cls, d: dict) -> "FileReport":
        return cls(d["path"], d["docs_read"], d["docs_written"], d["lines"],
                   Counter(d["skipped"]), [tuple(e) for e in d["examples"]], d.get("damaged", ""))


def _strict_error(path: str, line: int | None, reason: str, detail: str, key: str) -> DataError:
    where = f"{path}:{line}" if line else path
    what = SKIP_REASONS[reason].format(key=key)
    fix = "choose the field with --text-key, fix the input" if reason == "missing_field" else \
        "fix the input"
    return DataError(f"{where}: {what}" + (f" ({detail})" if detail else "")
                     + f"; {fix} or drop --strict to skip and count such records")


def check_text_key(report: FileReport, key: str) -> None:
    """DataError if a file's records were read but none had the text field (a wrong --text-key)."""
    s = report.skipped
    if s["missing_field"] and not s["empty"] and report.docs_read == sum(s.values()):
        raise DataError(f"no record of {report.path} has a string field {key!r} "
                        f"({_record_keys(report.path)}); choose the field with --text-key")


def _record_keys(path: str) -> str:
    """What fields a file's records do have: its first JSON object's keys, a parquet's columns."""
    if input_kind(Path(path)) == "parquet":
        return "columns: " + ", ".join(_parquet_file(path).schema_arrow.names)
    with _open_lines(path, 0) as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                return "the first record has " + _keys(record)
    return "no record is a JSON object"


def _keys(record) -> str:
    """A record's keys (the first 20) as messages name them."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not record:
        return "no keys"
    return "keys " + ", ".join(map(repr, list(record)[:20])) + (", ..." if len(record) > 20 else "")


def iter_unit_documents(unit: WorkUnit, text_key: str, strict: bool,
                        reports: dict[str, FileReport]) -> Iterator[str]:
    """Yield the unit's documents in input order, counting skips into `reports` (per file)."""
    for path in unit.files:
        report = reports.setdefault(path, FileReport(path))
        if unit.kind == "txt":
            yield from _read_txt(path, strict, report)
        elif unit.kind == "parquet":
            yield from _read_parquet(path, unit.start, unit.end, text_key, strict, report)
        else:
            yield from _read_jsonl(path, unit.start, unit.end, text_key, strict, report)


def _read_txt(path: str, strict: bool, report: FileReport) -> Iterator[str]:
    data = _read_bytes(path)
    report.docs_read += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise _strict_error(path, None, "invalid_utf8", str(e), "") from None
        report.skip("invalid_utf8", 0, str(e))
        return
    if not text:
        report.skip("empty", 0)
        return
    yield text


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"input {path} disappeared while tokenizing; "
                                f"check the input files and run again") from None


def _open_lines(path: str, start: int) -> io.BufferedIOBase:
    """A binary stream of the (decompressed) file positioned at the first line start >= start."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 20)
    f = open(path, "rb")
    if start > 0:
        f.seek(start - 1)
        f.readline()  # finishes the line that straddles `start`; it belongs to the unit before
    return f


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of all zstd frames of a file. zstandard's stream_reader stops
    quietly where a file is cut short; this raises EOFError there, as gzip does."""

    def __init__(self, path: str):
        if zstandard is None:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)")
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False   # the current frame has had input but not its end
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._at == len(self._out):
            block = self._file.read(1 << 17)
            if not block:
                if self._in_frame:
                    raise EOFError("the file ends in the middle of a zstd frame")
                return 0
            self._out, self._at = self._decompress(block), 0
        n = min(len(b), len(self._out) - self._at)
        b[:n] = memoryview(self._out)[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, block: bytes) -> bytes:
        out = []
        while block:
            out.append(self._frame.decompress(block))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            block = self._frame.unused_data  # the start of the next frame
            self._frame = self._dctx.decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _read_jsonl(path: str, start: int, end: int | None, key: str, strict: bool,
                report: FileReport) -> Iterator[str]:
    f = _open_lines(path, start)
    with f:
        pos = f.tell() if not path.lower().endswith((".gz", ".zst")) else 0
        first_pos = pos
        line_no = 0
        try:
            for raw in f:
                if end is not None and pos >= end:
                    break
                pos += len(raw)
                line_no += 1
                if not raw.strip():
                    continue  # blank lines separate nothing and are not records
                report.docs_read += 1
                reason, detail, text = _parse_record(raw, key)
                if reason is None and not text:
                    reason = "empty"
                if reason is not None:
                    if strict and reason != "empty":
                        # Report line numbers are fixed up after all units (merge_reports); an
                        # error stops now, so count the lines before this unit here (rare).
                        raise _strict_error(path, _lines_before(path, first_pos) + line_no,
                                            reason, detail, key)
                    report.skip(reason, line_no, detail, key)
                    continue
                yield text
        except DAMAGE_ERRORS as e:  # only compressed files raise these: one unit reads all of it
            _damaged(report, strict, e, "compressed data",
                     f"after {report.docs_read:,} records ({line_no:,} lines, {pos:,} bytes); "
                     f"the rest of the file was not read")
        report.lines += line_no


def _damaged(report: FileReport, strict: bool, e: Exception, what: str, where: str) -> None:
    """Record in the report that the file is damaged, where, and what was lost (--strict: raise)."""
    how = "ends early" if isinstance(e, EOFError) else "is corrupt"
    report.damaged = f"{what} {how} ({_first_line(e)}) {where}"
    if strict:
        raise DataError(f"{report.path}: {report.damaged}; replace the file, or drop --strict to "
                        f"keep the records before the damage") from None


def _lines_before(path: str, pos: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while pos > 0:
            block = f.read(min(pos, 1 << 24))
            if not block:
                break
            n += block.count(b"\n")
            pos -= len(block)
    return n


def _read_parquet(path: str, first_rg: int, end_rg: int, key: str, strict: bool,
                  report: FileReport) -> Iterator[str]:
    """Documents of row groups [first_rg, end_rg); report lines are row numbers (1-based)."""
    from pyarrow import ArrowException

    pf = _parquet_file(path)
    if key not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {key!r} (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); choose one with --text-key")
    row = sum(pf.metadata.row_group(i).num_rows for i in range(first_rg)) + 1
    base = row - 1
    # One row group at a time, so that the rows before a damaged one are kept.
    batches = (b for rg in range(first_rg, end_rg)
               for b in pf.iter_batches(columns=[key], row_groups=[rg], batch_size=4096))
    try:
        for batch in batches:
            for text in batch.column(0).to_pylist():
                report.docs_read += 1
                reason = None
                if not isinstance(text, str):
                    reason = "missing_field"
                elif not text:
                    reason = "empty"
                if reason is not None:
                    if strict and reason != "empty":
                        raise _strict_error(path, row, reason, f"row {row}", key)
                    report.skip(reason, row - base, "", key)
                else:
                    yield text
                row += 1
    except (OSError, ArrowException) as e:  # a damaged page: pyarrow raises a bare OSError
        last = sum(pf.metadata.row_group(i).num_rows for i in range(end_rg))
        _damaged(report, strict, e, "parquet data", f"at row {row:,}; rows {row:,}..{last:,} "
                                                    f"were not read")
    report.lines += row - 1 - base


def _parse_record(raw: bytes, key: str):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "invalid_utf8", str(e), None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return "invalid_json", e.msg, None
    text = record.get(key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return "missing_field", _keys(record), None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes can spell lone surrogates, which UTF-8 cannot hold
        return "invalid_utf8", "lone surrogate in JSON string", None
    return None, "", text


def merge_reports(unit_reports: list[list[FileReport]]) -> list[FileReport]:
    """Combine per-unit reports (in unit order) into per-file ones with absolute line numbers."""
    merged: dict[str, FileReport] = {}
    for reports in unit_reports:
        for r in reports:
            m = merged.setdefault(r.path, FileReport(r.path))
            m.docs_read += r.docs_read
            m.docs_written += r.docs_written
            m.skipped.update(r.skipped)
            m.damaged = m.damaged or r.damaged
            for line, reason in r.examples:
                if len(m.examples) < MAX_EXAMPLES:
                    m.examples.append((line + m.lines if line else 0, reason))
            m.lines += r.lines
    return [merged[p] for p in sorted(merged)]


def read_documents(paths, text_key: str = "text",
                   reports: dict[str, FileReport] | None = None) -> Iterator[str]:
    """All non-empty documents of the input files, in sorted file order; malformed records and
    damaged compressed files are skipped and counted into `reports` (path -> FileReport)."""
    reports = {} if reports is None else reports
    for unit in plan_units(expand_inputs(paths), unit_bytes=1 << 62):
        yield from iter_unit_documents(unit, text_key, False, reports)
        for path in unit.files:
            check_text_key(reports[path], text_key)
