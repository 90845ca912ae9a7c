#!/usr/bin/env python
"""Build the long-range study's corpus: long English technical documents from Debian packages.

    python benchmarks/long_range/corpus.py [--out .study] [--work .study-build] [--any-version]

Needs apt-get (Debian's package index; run `apt-get update` once) and dpkg-deb. Each source is one
Debian package, pinned to the version below; a document is one file of it (a kernel .rst, a Python
library page, a Perl pod, a Vim help file, a PostgreSQL page, ...), converted to plain text (HTML
pages: the page's text without navigation; everything else as written). Documents shorter than
MIN_CHARS characters and exact duplicates are dropped.

Split by document: the documents sorted by length are cut into blocks of VALID_EVERY, and one
document of each block (chosen by a seeded hash) goes to the validation split, so the validation
documents have the length distribution of the whole (which the position buckets need).

Writes into --out (the folder the GPU runs carry):
    train.jsonl.xz, valid.jsonl.xz   one document per line: {"text", "source", "path"}; order shuffled (seeded)
    tokenizer.model, tokenizer.json  sentencepiece BPE (python -m rrwkv.data_tools train-tokenizer) on train
    corpus.json                      sources (package, version, .deb sha256), sizes, token counts and
                                     the document-length distribution of both splits
and keeps the downloaded packages, plain .jsonl and tokenized shards in --work (not carried).
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import html.parser
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
MIN_CHARS = 1000           # shorter documents (stubs, index pages) are dropped
VALID_EVERY = 20           # one document in 20 (5%) is held out
SPLIT_SEED = 7
VOCAB_SIZE = 2048          # configs/study/base.yaml
TOKENIZER_SAMPLE_DOCS = 3000
LENGTH_MARKS = (1024, 4096, 16384, 65536)


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    version: str
    root: str                           # folder inside the package (for kernel: inside the source tarball)
    include: Tuple[str, ...]            # fnmatch patterns on the path below root
    exclude: Tuple[str, ...] = ()
    fmt: str = "text"                   # text | html
    keep: Optional[Tuple[str, str]] = None  # html: only the text inside the element with this ("tag"|"id", value)
    nested_tar: Optional[str] = None    # a tarball inside the package holding root


SOURCES = (
    Source("linux-docs", "linux-source-6.12", "6.12.117-1~deb12u1", "linux-source-6.12/Documentation",
           ("*.rst", "*.txt"), ("translations/*", "devicetree/*"),
           nested_tar="usr/src/linux-source-6.12.tar.xz"),
    Source("python-docs", "python3.11-doc", "3.11.2-6+deb12u9", "usr/share/doc/python3.11/html/_sources",
           ("*.rst.txt",)),
    Source("perl-docs", "perl-doc", "5.36.0-7+deb12u4", "usr/share/perl/5.36.0/pod", ("*.pod",),
           ("perltoc.pod", "perluniprops.pod")),            # a table of contents, Unicode property tables
    Source("vim-help", "vim-runtime", "2:9.0.1378-2+deb12u2", "usr/share/vim/vim90/doc", ("*.txt",),
           ("version*.txt",)),                                # patch logs
    Source("git-docs", "git-doc", "1:2.39.5-0+deb12u3", "usr/share/doc/git-doc", ("*.txt",)),
    Source("postgresql-docs", "postgresql-doc-15", "15.20-0+deb12u1", "usr/share/doc/postgresql-doc-15/html",
           ("*.html",), ("bookindex.html",), fmt="html"),
    Source("nodejs-docs", "nodejs-doc", "18.20.4+dfsg-1~deb12u3", "usr/share/doc/nodejs/api", ("*.md.gz",)),
    Source("rust-books", "rust-doc", "1.63.0+dfsg1-2", "usr/share/doc/rust-doc/html",
           tuple(f"{b}/*.html" for b in ("book", "reference", "nomicon", "edition-guide", "embedded-book",
                                         "rust-by-example", "rustc", "rustdoc")),
           ("*/print.html", "*/toc.html", "*/404.html", "book/2018-edition/*", "book/first-edition/*",
            "book/second-edition/*"), fmt="html", keep=("tag", "main")),
    Source("django-docs", "python-django-doc", "3:3.2.25-0+deb12u7", "usr/share/doc/python-django-doc/html",
           tuple(f"{d}/*.html" for d in ("faq", "howto", "internals", "intro", "misc", "ref", "releases", "topics")),
           fmt="html", keep=("id", "yui-main")),
    Source("r-manuals", "r-doc-html", "4.2.2.20221110-2", "usr/share/R/doc/manual", ("*.html",), fmt="html"),
)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---- packages ----

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def candidate_version(package: str) -> Optional[str]:
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else None


def download(src: Source, debs: Path, any_version: bool) -> Tuple[Path, str]:
    """The package's .deb in `debs` (downloaded with apt-get if absent) and the version it is."""
    version = src.version
    found = sorted(debs.glob(f"{src.package}_*.deb"))
    wanted = [p for p in found if deb_version(p) == version]
    if wanted:
        return wanted[0], version
    if any_version and found:
        return found[-1], deb_version(found[-1])
    if shutil.which("apt-get") is None:
        fail("apt-get not found: build the corpus on a Debian machine (or put the .deb files in --work/debs)")
    r = subprocess.run(["apt-get", "download", f"{src.package}={version}"], cwd=debs, capture_output=True, text=True)
    if r.returncode != 0 and any_version:
        version = candidate_version(src.package) or version
        r = subprocess.run(["apt-get", "download", f"{src.package}={version}"], cwd=debs,
                           capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        fail(f"apt-get download {src.package}={version} failed ({last}); run `apt-get update`, "
             f"or pass --any-version to take the version the index offers")
    got = [p for p in debs.glob(f"{src.package}_*.deb") if deb_version(p) == version]
    if not got:
        fail(f"apt-get download {src.package}={version} wrote no matching .deb in {debs}")
    return got[0], version


def deb_version(path: Path) -> str:
    out = subprocess.run(["dpkg-deb", "-f", str(path), "Version"], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{path} is not a readable .deb ({out.stderr.strip()}); delete it and run again")
    return out.stdout.strip()


def package_files(deb: Path, src: Source) -> Iterator[Tuple[str, bytes]]:
    """(path below src.root, bytes) of the package's files that src includes, in archive order."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
            if src.nested_tar is None:
                yield from _members(outer, src)
            else:
                for m in outer:
                    if m.name.lstrip("./") == src.nested_tar:
                        with tarfile.open(fileobj=outer.extractfile(m), mode="r|*") as inner:
                            yield from _members(inner, src)
                        break
                else:
                    fail(f"{deb.name} holds no {src.nested_tar}")
    finally:
        proc.stdout.close()
        proc.wait()


def _members(tar: tarfile.TarFile, src: Source) -> Iterator[Tuple[str, bytes]]:
    prefix = src.root.rstrip("/") + "/"
    for m in tar:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if not m.isfile() or not name.startswith(prefix):
            continue
        rel = name[len(prefix):]
        if any(fnmatch.fnmatch(rel, p) for p in src.include) and \
                not any(fnmatch.fnmatch(rel, p) for p in src.exclude):
            yield rel, tar.extractfile(m).read()


# ---- text ----

BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
              "pre", "table", "tr", "blockquote", "section", "hr", "title", "figure", "caption"}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}
SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "button"}
SKIP_CLASSES = {"navheader", "navfooter", "sidebar", "nav-chapters", "nav-wrapper", "menu-bar", "headerlink"}
SKIP_DIV_CLASSES = {"header"}   # the navigation lines of texinfo's HTML (mdbook's headings are <a class="header">)


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: blocks on their own lines, <pre> kept as written."""

    def __init__(self, keep: Optional[Tuple[str, str]]):
        super().__init__(convert_charrefs=True)
        self.keep = keep
        self.stack: List[Tuple[str, bool, bool]] = []   # (tag, skipping, is the kept element) of open elements
        self.parts: List[str] = []
        self.in_main = 0
        self.in_pre = 0

    def _skipping(self) -> bool:
        return any(s for _, s, _ in self.stack) or (self.keep is not None and not self.in_main)

    def handle_starttag(self, tag, attrs):
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        if tag in VOID_TAGS:
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = tag in SKIP_TAGS or bool(classes & SKIP_CLASSES) or (tag == "div" and bool(classes & SKIP_DIV_CLASSES))
        kept = self.keep is not None and (tag if self.keep[0] == "tag" else a.get(self.keep[0])) == self.keep[1]
        self.stack.append((tag, skip, kept))
        self.in_main += kept
        self.in_pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        for i in range(len(self.stack) - 1, -1, -1):       # close up to the matching open tag
            if self.stack[i][0] == tag:
                for t, _, kept in self.stack[i:]:
                    self.in_main -= kept
                    self.in_pre -= t == "pre"
                del self.stack[i:]
                break
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._skipping():
            return
        self.parts.append(data if self.in_pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [ln.rstrip() for ln in "".join(self.parts).split("\n")]
        out, blank = [], 0
        for ln in lines:
            blank = blank + 1 if not ln.strip() else 0
            if blank <= 1:
                out.append(ln if ln.strip() else "")
        return "\n".join(out).strip() + "\n"


def html_text(raw: str, keep: Optional[Tuple[str, str]] = None) -> str:
    p = _HTMLText(keep)
    p.feed(raw)
    p.close()
    return p.text()


def to_text(rel: str, data: bytes, fmt: str, keep: Optional[Tuple[str, str]] = None) -> Optional[str]:
    """The document's text, or None when it is not UTF-8."""
    if rel.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if fmt == "html":
        text = html_text(text, keep)
    return text.replace("\r\n", "\n")


# ---- corpus ----

@dataclass
class Doc:
    text: str
    source: str
    path: str
    digest: str = field(default="")


def collect(debs: Path, any_version: bool) -> Tuple[List[Doc], List[dict], Dict[str, int]]:
    docs: List[Doc] = []
    seen: set = set()
    dropped = {"short": 0, "duplicate": 0, "not_utf8": 0}
    sources = []
    for src in SOURCES:
        deb, version = download(src, debs, any_version)
        n0, c0 = len(docs), sum(len(d.text) for d in docs)
        for rel, data in package_files(deb, src):
            text = to_text(rel, data, src.fmt, src.keep)
            if text is None:
                dropped["not_utf8"] += 1
                continue
            if len(text) < MIN_CHARS:
                dropped["short"] += 1
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(digest)
            docs.append(Doc(text, src.name, rel, digest))
        n, chars = len(docs) - n0, sum(len(d.text) for d in docs) - c0
        if n == 0:
            fail(f"{deb.name} gave no documents under {src.root}: its layout changed; update SOURCES in {__file__}")
        sources.append({"name": src.name, "package": src.package, "version": version, "deb": deb.name,
                        "deb_sha256": sha256_file(deb), "documents": n, "chars": chars})
        print(f"  {src.name:16s} {src.package}={version}: {n} documents, {chars / 1e6:.1f}M characters", flush=True)
    return docs, sources, dropped


def split(docs: List[Doc], every: int = VALID_EVERY, seed: int = SPLIT_SEED) -> Tuple[List[Doc], List[Doc]]:
    """(train, valid): one document of each block of `every` in length order goes to valid."""
    by_len = sorted(docs, key=lambda d: (len(d.text), d.digest))
    train, valid = [], []
    for b in range(0, len(by_len), every):
        block = by_len[b:b + every]
        pick = int(hashlib.sha256(f"{seed}:{b // every}".encode()).hexdigest(), 16) % len(block)
        for i, d in enumerate(block):
            (valid if i == pick else train).append(d)
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def write_jsonl(docs: Sequence[Doc], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "source": d.source, "path": d.path}, ensure_ascii=False) + "\n")


def xz(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as fin, lzma.open(tmp, "wb", preset=9) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    os.replace(tmp, dst)


def run(cmd: List[str]) -> None:
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        fail(f"{' '.join(cmd[:4])} ... exited with status {r.returncode}")


def length_stats(doc_tokens: Sequence[int]) -> dict:
    s = sorted(doc_tokens)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"documents": len(s), "tokens": int(sum(s)), "median": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": s[-1], "at_least": {str(m): sum(1 for n in s if n >= m) for m in LENGTH_MARKS},
            "tokens_in_docs_at_least": {str(m): int(sum(n for n in s if n >= m)) for m in LENGTH_MARKS}}


def shard_doc_lengths(shard_dir: Path) -> List[int]:
    from rrwkv.pretrain.evaluation import iter_documents
    return [len(t) for t in iter_documents(shard_dir)]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".study"), help="carried folder to write (default .study)")
    p.add_argument("--work", default=str(ROOT / ".study-build"), help="downloads and intermediate files")
    p.add_argument("--any-version", action="store_true",
                   help="take the version apt offers when a pinned one is no longer in the index")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenize workers (for the figures)")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    print("collecting documents", flush=True)
    docs, sources, dropped = collect(debs, args.any_version)
    train, valid = split(docs)
    plain = work / "jsonl"
    plain.mkdir(exist_ok=True)
    for name, part in (("train", train), ("valid", valid)):
        write_jsonl(part, plain / f"{name}.jsonl")
    print(f"{len(docs)} documents ({len(train)} train, {len(valid)} valid), "
          f"{sum(len(d.text) for d in docs) / 1e6:.1f}M characters; dropped {dropped}", flush=True)

    print("training the tokenizer", flush=True)
    py = sys.executable
    run([py, "-m", "rrwkv.data_tools", "train-tokenizer", "--input", str(plain / "train.jsonl"), "--vocab-size",
         str(VOCAB_SIZE), "--output", str(out / "tokenizer"), "--sample-docs", str(TOKENIZER_SAMPLE_DOCS),
         "--seed", str(SPLIT_SEED)])
    stats = {}
    for name in ("train", "valid"):
        shards = work / "shards" / name
        run([py, "-m", "rrwkv.data_tools", "tokenize", "--input", str(plain / f"{name}.jsonl"), "--tokenizer",
             str(out / "tokenizer.model"), "--output", str(shards), "--workers", str(args.workers),
             "--overwrite", "--no-progress"])
        lengths = shard_doc_lengths(shards)
        chars = sum(len(d.text) for d in (train if name == "train" else valid))
        stats[name] = {**length_stats(lengths), "chars": chars,
                       "chars_per_token": round(chars / max(1, sum(lengths)), 3),
                       "by_source": {s["name"]: sum(1 for d in (train if name == "train" else valid)
                                                    if d.source == s["name"]) for s in sources}}
    print("compressing", flush=True)
    for name in ("train", "valid"):
        xz(plain / f"{name}.jsonl", out / f"{name}.jsonl.xz")
    info = {"built_by": "benchmarks/long_range/corpus.py", "sources": sources, "dropped": dropped,
            "min_chars": MIN_CHARS, "valid_every": VALID_EVERY, "split_seed": SPLIT_SEED, "vocab_size": VOCAB_SIZE,
            "splits": stats,
            "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                      for f in sorted(out.iterdir()) if f.is_file() and f.name != "corpus.json"}}
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    for name in ("train", "valid"):
        s = stats[name]
        print(f"{name}: {s['documents']} documents, {s['chars'] / 1e6:.1f}M characters, "
              f"{s['tokens'] / 1e6:.2f}M tokens "
              f"({s['chars_per_token']} chars/token); documents of >= 1k / 4k / 16k tokens: "
              f"{s['at_least']['1024']} / {s['at_least']['4096']} / {s['at_least']['16384']}")
    print(f"wrote {out}: " + ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in info["files"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
