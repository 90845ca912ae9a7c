"""CPU tests of the kernel build machinery (kernels/build.py): cache location, lock recovery, errors.

They compile a tiny C++ extension (and, where nvcc is installed, a broken .cu file) with the same
code path the WKV kernel uses; no GPU is needed.
"""
import errno
import json
import multiprocessing
import os
import re
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


# The lock tests run their contenders as forked processes (fast: torch is already imported).
FORK = multiprocessing.get_context("fork")


def _hold(lock, mode, ready, host=None, heartbeat=5.0):
    if host:
        socket.gethostname = lambda: host        # this process plays a node of that name
    held = build.BuildLock(lock, mode=mode, heartbeat=heartbeat).acquire()
    ready.set()
    time.sleep(120)
    held.release()


def _holder(lock, mode, **kw):
    """A process holding the lock (until killed)."""
    ready = FORK.Event()
    p = FORK.Process(target=_hold, args=(lock, mode, ready), kwargs=kw, daemon=True)
    p.start()
    assert ready.wait(30), "the holder did not get the lock"
    return p


@pytest.mark.parametrize("mode", ["auto", "file"])
def test_a_killed_holder_does_not_block_the_next(tmp_path, mode, capfd):
    lock = tmp_path / "x.lock"
    p = _holder(lock, mode)
    try:
        with pytest.raises(TimeoutError) as e:            # a live holder is waited for, then one clear line
            build.BuildLock(lock, timeout=0.5, mode=mode).acquire()
        assert re.fullmatch(rf"rrwkv: timed out after \d+ s waiting for the kernel build lock {re.escape(str(lock))}"
                            rf"(\.soft)? held by pid {p.pid} on host {re.escape(socket.gethostname())}: .*", str(e.value))
        assert f"waiting for the build lock {lock}" in capfd.readouterr().err
    finally:
        p.kill()                                           # a compile killed mid-way
        p.join()
    t = time.monotonic()
    lk = build.BuildLock(lock, timeout=10, mode=mode, stale_after=3600)
    with lk:
        assert lk.mode == ("flock" if mode == "auto" else "file")
    assert time.monotonic() - t < 3
    assert lk.recovered_stale == (mode == "file")          # flock: the OS dropped it; file: dead pid seen
    assert not lk.soft_path.exists() and not lk.record.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == (["x.lock"] if mode == "auto" else [])


def _build_once(lock, mode, log):
    with build.BuildLock(lock, mode=mode, timeout=60, poll=0.05):
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\n")
        built = lock.with_name("built")
        if not built.exists():
            time.sleep(0.3)
            built.write_text("")
            with open(log, "a") as f:
                f.write("built\n")
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\n")


@pytest.mark.parametrize("mode", ["auto", "file"])
def test_contending_processes_build_once_one_at_a_time(tmp_path, mode):
    lock, log = tmp_path / "c.lock", tmp_path / "log"
    procs = [FORK.Process(target=_build_once, args=(lock, mode, log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    events = log.read_text().splitlines()
    assert events.count("built") == 1
    events = [ev for ev in events if ev != "built"]
    assert len(events) == 8
    for a, b in zip(events[::2], events[1::2]):            # nobody entered while another was inside
        assert a.startswith("in ") and b == "out " + a[3:]


@pytest.mark.parametrize("host, sig", [("some-other-node", signal.SIGKILL), (None, signal.SIGSTOP)])
def test_soft_lock_waited_for_while_its_holder_beats_taken_over_when_it_stops(tmp_path, host, sig):
    """Another host's holder (whose pid means nothing here), or a hung one of this host: its heartbeat
    keeps the lock however long it holds it; once the heartbeat stops, the lock is taken over."""
    lock = tmp_path / "h.lock"
    p = _holder(lock, "file", host=host, heartbeat=0.1)
    try:
        with pytest.raises(TimeoutError, match=f"held by pid {p.pid} on host {host or socket.gethostname()}"):
            build.BuildLock(lock, timeout=2.0, mode="file", stale_after=0.7).acquire()
        os.kill(p.pid, sig)                                 # that node dies / the holder hangs
        t = time.monotonic()
        lk = build.BuildLock(lock, timeout=10, mode="file", stale_after=0.7)
        with lk:
            assert lk.recovered_stale
        assert 0.4 < time.monotonic() - t < 5
    finally:
        p.kill()
        p.join()


def test_soft_lock_left_long_ago_is_taken_over_at_once(tmp_path):
    """A lock file whose holder (another host, or one that died before recording itself) stopped
    touching it long ago: no wait for `stale_after` to pass once more."""
    lk = build.BuildLock(tmp_path / "z.lock", timeout=10, mode="file", stale_after=30)
    lk.soft_path.write_text("")
    lk.record.write_text(json.dumps({"host": "some-other-node", "pid": 1}))
    with pytest.raises(TimeoutError, match="held by pid 1 on host some-other-node"):   # touched just now
        build.BuildLock(lk.path, timeout=0.5, mode="file", stale_after=30).acquire()
    old = time.time() - 1000
    os.utime(lk.soft_path, (old, old))
    t = time.monotonic()
    with lk:
        assert lk.recovered_stale
        assert json.loads(lk.record.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    assert time.monotonic() - t < 2


def test_no_flock_falls_back_to_the_soft_lock(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(build.fcntl, "flock", no_flock)   # as on an NFS mount without lock support
    with build.BuildLock(tmp_path / "n.lock", timeout=5) as lk:
        assert lk.mode == "file" and lk.soft_path.exists()


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
