"""The installed package lives beside the ecosystem: every name it installs is under `rrwkv`, it imports
from any directory next to transformers >= 5 (and Hugging Face's `kernels`, which transformers imports),
and its programs are console scripts."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = """
import kernels, transformers
from transformers import RwkvForCausalLM
from rrwkv.pretrain.model import RRWKV, RRWKVConfig
from rrwkv.kernels.wkv import wkv_retro, WKVState
from rrwkv.pretrain.convert import convert
from rrwkv.pretrain.data import TokenStream
import rrwkv.data_tools.cli
import torch
m = RRWKV(RRWKVConfig(vocab_size=50, n_layer=1, n_embd=16, ctx_len=32, medium_interval=4))
assert m(torch.zeros(1, 9, dtype=torch.long)).shape == (1, 9, 50)
print("HF_KERNELS", kernels.__file__)
print("TRANSFORMERS", transformers.__version__)
"""


def _python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["outside", "repo_root"])
def test_model_op_and_converter_import_beside_transformers(tmp_path, where):
    p = _python(IMPORTS, tmp_path if where == "outside" else ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    hf_kernels = Path(p.stdout.split("HF_KERNELS ")[1].split()[0])
    assert ROOT not in hf_kernels.parents, f"`import kernels` found the checkout's folder: {hf_kernels}"
    assert int(p.stdout.split("TRANSFORMERS ")[1].split(".")[0]) >= 5


def test_the_distribution_installs_only_rrwkv(tmp_path):
    """A built wheel holds `rrwkv/...` and its metadata, nothing else at the top (the kernel sources too)."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rrwkv"}, tops
    for member in ("rrwkv/pretrain/model.py", "rrwkv/kernels/wkv.py", "rrwkv/kernels/csrc/wkv.cu",
                   "rrwkv/data_tools/cli.py", "rrwkv/pretrain/cli/train.py", "rrwkv/pretrain/data/stream.py"):
        assert member in names, member


def test_console_scripts(tmp_path):
    scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.value.startswith("rrwkv.")}
    assert {"rrwkv-pretrain", "rrwkv-export", "rrwkv-generate", "rrwkv-evaluate", "rrwkv-convert",
            "rrwkv-benchmark", "rrwkv-data"} <= scripts
    bindir = Path(sysconfig.get_path("scripts"))
    exe = shutil.which("rrwkv-pretrain", path=str(bindir)) or shutil.which("rrwkv-pretrain")
    assert exe, "rrwkv-pretrain is not on PATH"
    t0 = time.perf_counter()
    p = subprocess.run([exe, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    for key in ("model.medium_interval", "train.max_steps", "parallel.zero_stage = 2", "optim.schedule = cosine"):
        assert key in p.stdout, key
    assert took < 30, f"--help took {took:.1f} s"
    p = subprocess.run([str(Path(exe).with_name("rrwkv-data")), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "tokenize" in p.stdout, p.stderr[-2000:]


def test_launch_scripts_have_no_path_edits():
    for script in (ROOT / "launch").glob("*.py"):
        assert "sys.path" not in script.read_text(), script


def test_help_does_not_load_deepspeed(tmp_path):
    code = ("import sys\nfrom rrwkv.pretrain.cli.train import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('LOADED', 'deepspeed' in sys.modules)")
    p = _python(code, tmp_path)
    assert p.returncode == 0 and "LOADED False" in p.stdout, p.stdout[-500:] + p.stderr[-2000:]
