"""CPU tests of the kernel build machinery (kernels/build.py): cache location, lock recovery, errors.

They compile a tiny C++ extension (and, where nvcc is installed, a broken .cu file) with the same
code path the WKV kernel uses; no GPU is needed.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rrwkv.kernels import build

ROOT = Path(__file__).resolve().parents[1]

TINY = textwrap.dedent("""
    #include <pybind11/pybind11.h>
    int add(int a, int b) { return a + b; }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add", &add); }
""")


def _py(code, env=None, timeout=120):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("RRWKV_KERNEL_CACHE", raising=False)
    build.set_cache_dir(None)
    assert build.cache_root() == Path.home() / ".cache" / "rrwkv" / "kernels"
    monkeypatch.setenv("RRWKV_KERNEL_CACHE", str(tmp_path / "env"))
    assert build.cache_root() == tmp_path / "env"
    build.set_cache_dir(str(tmp_path / "cfg"))
    try:
        assert build.cache_root() == tmp_path / "cfg"
        assert build.cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    finally:
        build.set_cache_dir(None)
    assert build.cache_root() == tmp_path / "env"


def test_source_hash_tracks_sources_and_flags(tmp_path):
    f = tmp_path / "a.cu"
    f.write_text("int x;")
    h1 = build.source_hash([f], ["-O3"])
    assert build.source_hash([f], ["-O3"]) == h1
    assert build.source_hash([f], ["-O2"]) != h1
    f.write_text("int y;")
    assert build.source_hash([f], ["-O3"]) != h1
    # The WKV sources exist and hash.
    assert len(build.source_hash([build.CSRC / s for s in build.WKV_SOURCES + build.WKV_HEADERS])) == 16


def test_another_source_folder_is_its_own_build(monkeypatch, tmp_path):
    """RRWKV_WKV_CSRC (the baseline of an A/B benchmark): another version of the sources gets its own
    module name and loaded-module key; an incomplete folder is one clear error."""
    import shutil
    import torch
    monkeypatch.delenv("RRWKV_WKV_CSRC", raising=False)
    name, src, _, _ = build.host_build_spec(torch.float32)
    assert src == build.CSRC
    settings = build.cache_settings()
    copy = tmp_path / "csrc"
    shutil.copytree(build.CSRC, copy)
    monkeypatch.setenv("RRWKV_WKV_CSRC", str(copy))
    assert build.cache_settings() != settings                    # kernels.cuda looks the module up again
    assert build.host_build_spec(torch.float32)[:2] == (name, copy)   # same sources: the same cached build
    with open(copy / "wkv_algo.h", "a") as f:
        f.write("// another version\n")
    assert build.host_build_spec(torch.float32)[0] != name
    (copy / "wkv.cpp").unlink()
    with pytest.raises(build.KernelBuildError, match=r"RRWKV_WKV_CSRC=.* lacks wkv.cpp"):
        build.host_build_spec(torch.float32)


def test_flock_is_released_when_the_holder_is_killed(tmp_path):
    lock = tmp_path / "x.lock"
    p = _py(f"""
        import time, sys
        from rrwkv.kernels.build import BuildLock
        l = BuildLock({str(lock)!r}).acquire()
        print("LOCKED", l.mode, flush=True)
        time.sleep(120)
    """)
    line = p.stdout.readline()
    assert line.startswith("LOCKED"), line
    try:
        with pytest.raises(TimeoutError):
            build.BuildLock(lock, timeout=0.5).acquire()     # a live holder is waited on
    finally:
        os.kill(p.pid, signal.SIGKILL)                        # a compile killed mid-way
        p.wait()
    t = time.monotonic()
    with build.BuildLock(lock, timeout=10):
        pass
    assert time.monotonic() - t < 5


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_file_lock_taken_over_from_dead_process_on_this_host(tmp_path):
    lock = tmp_path / "y.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": time.time()}))
    lk = build.BuildLock(lock, timeout=5, mode="file", stale_after=3600)
    t = time.monotonic()
    with lk:
        assert lk.recovered_stale
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - t < 3
    assert not lock.exists()


def test_file_lock_of_other_host_stale_only_without_heartbeat(tmp_path):
    lock = tmp_path / "z.lock"
    lock.write_text(json.dumps({"host": "some-other-node", "pid": 1, "time": 0}))
    with pytest.raises(TimeoutError):                      # fresh mtime: a live compile elsewhere
        build.BuildLock(lock, timeout=0.6, mode="file", stale_after=30).acquire()
    old = time.time() - 1000
    os.utime(lock, (old, old))                             # its heartbeat stopped long ago
    lk = build.BuildLock(lock, timeout=5, mode="file", stale_after=30)
    with lk:
        assert lk.recovered_stale


def test_file_lock_heartbeat_keeps_a_live_lock(tmp_path):
    lock = tmp_path / "h.lock"
    holder = build.BuildLock(lock, mode="file", heartbeat=0.1, stale_after=0.5).acquire()
    try:
        # Same host and a live pid, and the heartbeat keeps the mtime fresh past stale_after.
        with pytest.raises(TimeoutError):
            build.BuildLock(lock, timeout=1.5, mode="file", stale_after=0.5).acquire()
        assert time.time() - lock.stat().st_mtime < 0.5
    finally:
        holder.release()
    assert not lock.exists()


def test_missing_nvcc_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k() {}\n")
    with pytest.raises(build.KernelBuildError) as e:
        build.build_extension("rrwkv_test_nonvcc", [src], tmp_path / "cache", "key")
    msg = str(e.value)
    assert "nvcc" in msg and "cuda_kernel=false" in msg


@pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")
def test_compile_error_carries_the_compiler_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")    # no GPU here to ask for its architecture
    src = tmp_path / "broken.cu"
    src.write_text("__global__ void k(float* x) { x[0] = undeclared_thing_42; }\n")
    with pytest.raises(build.KernelBuildError) as e:
        build.build_extension("rrwkv_test_broken", [src], tmp_path / "cache", "key",
                              extra_cuda_cflags=["-O0"])
    msg = str(e.value)
    assert "undeclared_thing_42" in msg           # the compiler's own diagnostic
    assert "cuda_kernel=false" in msg             # and how to fall back to the reference
    assert not (tmp_path / "cache" / "rrwkv_test_broken" / "BUILD_OK").exists()


def test_concurrent_processes_compile_once_then_warm_import(tmp_path):
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    cache = tmp_path / "cache"
    name = "rrwkv_test_tiny"
    # A stale torch build lock (left by a killed torch build) must not make anyone wait forever.
    (cache / name).mkdir(parents=True)
    (cache / name / "lock").write_text("")
    code = f"""
        import time
        from pathlib import Path
        from torch.utils import cpp_extension
        from rrwkv.kernels import build
        real = cpp_extension.load
        def counted(*a, **k):
            print("COMPILING", flush=True)
            return real(*a, **k)
        cpp_extension.load = counted
        t = time.time()
        m = build.build_extension({name!r}, [Path({str(src)!r})], Path({str(cache)!r}), "k1", needs_nvcc=False)
        print("RESULT", m.add(2, 3), round(time.time() - t, 3), flush=True)
    """
    procs = [_py(code) for _ in range(2)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        outs.append(out)
    assert sum(o.count("COMPILING") for o in outs) == 1, outs
    assert all("RESULT 5" in o for o in outs), outs
    # Warm: a new process imports the cached module without running the build at all.
    warm = _py(f"""
        import time
        from pathlib import Path
        from torch.utils import cpp_extension
        from rrwkv.kernels import build
        def no_build(*a, **k):
            raise AssertionError("rebuilt although cached")
        cpp_extension.load = no_build
        t = time.time()
        m = build.build_extension({name!r}, [Path({str(src)!r})], Path({str(cache)!r}), "k1", needs_nvcc=False)
        print("WARM", m.add(4, 5), time.time() - t, flush=True)
    """)
    out, _ = warm.communicate(timeout=60)
    assert warm.returncode == 0, out
    line = [ln for ln in out.splitlines() if ln.startswith("WARM")][0].split()
    assert line[1] == "9" and float(line[2]) < 2.0
    # A different key (changed sources or flags) is a rebuild, not a stale import.
    assert (cache / name / "BUILD_OK").read_text().strip() == "k1"


def test_cuda_backend_imports_without_a_gpu():
    from rrwkv.kernels import cuda as kc   # noqa: F401  (compiles nothing at import)
    assert callable(kc.wkv_retro_cuda)
