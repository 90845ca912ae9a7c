"""benchmarks/run.py make-variant: copies of the kernel sources with other macro defaults, for the
GPU A/B runs (the kernel experiment's --variant)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "make-variant", *map(str, args)], capture_output=True,
                          text=True)


def defines(csrc: Path, name: str):
    return [ln for f in sorted(csrc.iterdir()) for ln in f.read_text().splitlines()
            if re.match(rf"#define {name}( |$)", ln)]


def test_variant_sets_the_defaults_and_leaves_the_rest(tmp_path):
    out = tmp_path / "sub4"
    r = run(out, "WKV_SUB=4", "WKV_MINB_BWD_OUT=7")
    assert r.returncode == 0, r.stderr
    csrc = out / "kernels" / "csrc"
    assert defines(csrc, "WKV_SUB") == ["#define WKV_SUB 4"]
    assert defines(csrc, "WKV_MINB_BWD_OUT") == ["#define WKV_MINB_BWD_OUT 7"]
    orig = ROOT / "kernels" / "csrc"
    assert sorted(p.name for p in csrc.iterdir()) == sorted(p.name for p in orig.iterdir())
    assert defines(csrc, "WKV_WIN") == defines(orig, "WKV_WIN")
    changed = [p.name for p in orig.iterdir() if p.read_text() != (csrc / p.name).read_text()]
    assert sorted(changed) == ["wkv.cu", "wkv.h"]


def test_unknown_macro_stops_with_nothing_written(tmp_path):
    out = tmp_path / "bad"
    r = run(out, "WKV_SUB=4", "NO_SUCH_MACRO=1")
    assert r.returncode != 0
    assert "NO_SUCH_MACRO" in r.stderr
    assert not out.exists()
    r = run(out, "WKV_SUB")
    assert r.returncode != 0 and "NAME=VALUE" in r.stderr and not out.exists()
