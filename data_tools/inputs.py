"""Input documents: finding input files, cutting them into deterministic work units, reading them.

A work unit is a piece of the input that one worker tokenizes into its own shards: a group of
whole .txt files, a byte range of an uncompressed .jsonl (cut at line starts), or one whole
compressed .jsonl.gz/.jsonl.zst. Units depend only on the input files and `unit_bytes`, never on
the number of workers, so any worker count writes the same shards.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES
MAX_EXAMPLES = 10  # skipped records whose file:line is kept for the report, per input file

# Why a record was skipped; `empty` is normal data, the others are malformed input (--strict).
SKIP_REASONS = {
    "empty": "empty document",
    "invalid_json": "not valid JSON",
    "missing_field": "no string field {key!r}",
    "invalid_utf8": "not valid UTF-8",
}


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def expand_inputs(paths) -> list[Path]:
    """Input files, sorted; directories are searched recursively for supported files."""
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file() and input_kind(f)]
            if not found:
                raise DataError(f"input directory {p} holds no {'/'.join(SUPPORTED)} files")
            files.update(found)
        elif p.is_file():
            if input_kind(p) is None:
                raise DataError(f"input {p} has an unsupported type: use .txt (one document "
                                f"per file) or .jsonl / .jsonl.gz / .jsonl.zst")
            files.add(p)
        else:
            raise FileNotFoundError(f"input {p} not found: check the path given to --input")
    if not files:
        raise DataError("no input files given: pass them with --input")
    return sorted(files)


@dataclass(frozen=True)
class WorkUnit:
    """One worker's share of the input: `files` (whole) or one file's bytes [start, end)."""
    index: int
    kind: str                     # "txt" | "jsonl"
    files: tuple[str, ...]
    start: int = 0
    end: int | None = None        # None: to the end of the file

    def describe(self) -> str:
        if self.kind == "txt":
            return f"{len(self.files)} text file(s) from {self.files[0]}"
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
        if f.name.lower().endswith(".jsonl") and size > unit_bytes:
            for start in range(0, size, unit_bytes):
                end = min(start + unit_bytes, size)
                units.append(WorkUnit(len(units), "jsonl", (str(f),), start, end))
        else:  # compressed streams cannot be entered in the middle
            units.append(WorkUnit(len(units), "jsonl", (str(f),)))
    flush_txt()
    return units


@dataclass
class FileReport:
    """Counts for one input file (or one unit's part of it); lines are relative to `first_line`."""
    path: str
    docs_read: int = 0
    docs_written: int = 0
    lines: int = 0                       # lines this unit read (to number lines across units)
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)   # [(line, reason)]

    def skip(self, reason: str, line: int, detail: str = "", key: str = "text") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            what = SKIP_REASONS[reason].format(key=key)
            self.examples.append((line, what + (f" ({detail})" if detail else "")))

    def to_json(self) -> dict:
        return {"path": self.path, "docs_read": self.docs_read, "docs_written": self.docs_written,
                "lines": self.lines, "skipped": dict(sorted(self.skipped.items())),
                "examples": [list(e) for e in self.examples]}

    @classmethod
    def from_json(cls, d: dict) -> "FileReport":
        return cls(d["path"], d["docs_read"], d["docs_written"], d["lines"],
                   Counter(d["skipped"]), [tuple(e) for e in d["examples"]])


def _strict_error(path: str, line: int | None, reason: str, detail: str, key: str) -> DataError:
    where = f"{path}:{line}" if line else path
    what = SKIP_REASONS[reason].format(key=key)
    return DataError(f"{where}: record is {what}" + (f" ({detail})" if detail else "")
                     + "; fix the input or drop --strict to skip and count such records")


def iter_unit_documents(unit: WorkUnit, text_key: str, strict: bool,
                        reports: dict[str, FileReport]) -> Iterator[str]:
    """Yield the unit's documents in input order, counting skips into `reports` (per file)."""
    for path in unit.files:
        report = reports.setdefault(path, FileReport(path))
        if unit.kind == "txt":
            yield from _read_txt(path, strict, report)
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
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True))
    f = open(path, "rb")
    if start > 0:
        f.seek(start - 1)
        f.readline()  # finishes the line that straddles `start`; it belongs to the unit before
    return f


def _read_jsonl(path: str, start: int, end: int | None, key: str, strict: bool,
                report: FileReport) -> Iterator[str]:
    f = _open_lines(path, start)
    with f:
        pos = f.tell() if not path.lower().endswith((".gz", ".zst")) else 0
        line_no = 0
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
                    # Line numbers of later units are fixed up by the caller (see report_lines).
                    raise _strict_error(path, line_no if start == 0 else None, reason,
                                        detail or f"byte range from {start}", key)
                report.skip(reason, line_no, detail if reason != "missing_field" else "", key)
                continue
            yield text
        report.lines += line_no


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
        return "missing_field", f"no string field {key!r}", None
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
            for line, reason in r.examples:
                if len(m.examples) < MAX_EXAMPLES:
                    m.examples.append((line + m.lines if line else 0, reason))
            m.lines += r.lines
    return [merged[p] for p in sorted(merged)]


def read_documents(paths, text_key: str = "text") -> Iterator[str]:
    """All non-empty documents of the input files, in sorted file order (skips malformed records)."""
    for unit in plan_units(expand_inputs(paths), unit_bytes=1 << 62):
        yield from iter_unit_documents(unit, text_key, False, {})
