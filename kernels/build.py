"""Compile-at-launch of the WKV CUDA kernel: cache, one compile per node (file lock), clear errors.

The extension is built with torch.utils.cpp_extension.load the first time a process needs it, into
a cache directory keyed by the hash of its sources and flags, the GPU architecture and the input
dtype (one small module per dtype). Where the cache lives, in order:
  1. the `cache_dir` argument of load_wkv_extension(),
  2. set_cache_dir() (the training config calls it with its `model.kernel_cache_dir`),
  3. the environment variable RRWKV_KERNEL_CACHE (point it at a shared filesystem to compile once
     for the whole cluster),
  4. ~/.cache/rrwkv/kernels.
Concurrent processes (the local ranks of a node, or nodes sharing the cache) serialize on a lock
next to the build folder (BuildLock, from the package filelock): one compiles, the others wait and
then import the result. It is an flock(2) lock (filelock.FileLock), which the kernel drops when its
holder dies, so a killed compile never leaves a lock that is waited on forever. On filesystems
without flock it is a lock file (filelock.SoftFileLock) that its holder touches every few seconds and
that a waiter takes over when the holder is a dead process (same host) or stopped touching it (any
host). torch's own build-folder lock (a plain file named `lock`, which a killed torch build leaves
behind and which makes torch wait forever) is removed while our lock is held, since then nobody else
can be building.
A build that completed is recorded by a marker file; later loads import the .so directly (no ninja
run), which takes well under a second.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

import filelock
import torch

CSRC = Path(__file__).resolve().parent / "csrc"
WKV_SOURCES = ("wkv.cu", "wkv.cpp")
WKV_HEADERS = ("wkv.h", "wkv_algo.h")
WKV_HOST_SOURCES = ("wkv_host.cpp", "wkv.cpp")
DTYPE_IDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Bump when the build recipe below changes in a way the sources' hash does not capture.
RECIPE_VERSION = "2"

_cache_dir_override: Optional[str] = None
_loaded: Dict[str, object] = {}
_load_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """The CUDA kernel could not be built or loaded (message holds the compiler's output)."""


def set_cache_dir(path: Optional[str]) -> None:
    """Where compiled kernels are cached (None: back to RRWKV_KERNEL_CACHE or the default)."""
    global _cache_dir_override
    _cache_dir_override = None if path in (None, "") else str(path)


def cache_settings() -> tuple:
    """What the loaded module depends on besides dtype and device, cheap to read on every call (a key
    for loaded modules): the cache directory, and the source folder (RRWKV_WKV_CSRC)."""
    return _cache_dir_override, os.environ.get("RRWKV_KERNEL_CACHE"), os.environ.get("RRWKV_WKV_CSRC")


def csrc_dir(sources: Iterable[str]) -> Path:
    """The kernel's source folder: kernels/csrc, or RRWKV_WKV_CSRC (another version of the same files,
    e.g. the baseline of an A/B benchmark in one process: each version is its own cached build)."""
    other = os.environ.get("RRWKV_WKV_CSRC")
    if not other:
        return CSRC
    d = Path(other).expanduser()
    missing = [f for f in sources if not (d / f).is_file()]
    if missing:
        raise KernelBuildError(f"rrwkv: RRWKV_WKV_CSRC={other} lacks {', '.join(missing)}: point it at a copy of "
                               f"kernels/csrc (e.g. git archive REV kernels/csrc | tar -x -C DIR; then DIR/kernels/csrc) "
                               f"or unset it")
    return d.resolve()


def cache_root(cache_dir: Optional[str] = None) -> Path:
    for cand in (cache_dir, _cache_dir_override, os.environ.get("RRWKV_KERNEL_CACHE")):
        if cand:
            return Path(cand).expanduser()
    return Path.home() / ".cache" / "rrwkv" / "kernels"


def source_hash(files: Iterable[Path], flags: Iterable[str] = ()) -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    for f in sorted(Path(x) for x in files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for fl in flags:
        h.update(fl.encode() + b"\0")
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    return h.hexdigest()[:16]


def find_nvcc() -> Optional[str]:
    """Path of nvcc as torch's extension builder will find it, or None."""
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if home:
        p = Path(home) / "bin" / "nvcc"
        if p.exists():
            return str(p)
    return shutil.which("nvcc")


def _ensure_cuda_home() -> None:
    """torch's builder needs CUDA_HOME; derive it from nvcc on PATH when torch found none."""
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME:
        return
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = str(Path(os.path.realpath(nvcc)).parent.parent)
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("CUDA_HOME", home)


# ------------------------------------------------------------------------------------------ lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _flock_works(path: Path) -> bool:
    """Whether the filesystem of `path` supports flock(2) (some network filesystems answer ENOLCK)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # a probe (the close drops it); EWOULDBLOCK: works
    except OSError as e:
        return e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(fd)
    return True


class BuildLock:
    """An exclusive inter-process lock on `path` that never waits on a dead holder (module doc).

    mode "flock": filelock.FileLock on `path`. mode "file": filelock.SoftFileLock on `path`.soft, which
    the holder touches every `heartbeat` s and a waiter removes when the holder is a dead process of
    this host or left it untouched for `stale_after` s (clocks, the file server's too, must agree well
    within that).
    "auto": "flock" where the filesystem supports it. The holder's host and pid are in `path`.owner.
    """

    def __init__(self, path, timeout: float = 600.0, mode: str = "auto", heartbeat: float = 5.0,
                 stale_after: float = 60.0, poll: float = 0.2):
        self.path = Path(path)
        self.soft_path, self.record = (self.path.with_name(self.path.name + s) for s in (".soft", ".owner"))
        self.timeout, self.mode, self.heartbeat = timeout, mode, heartbeat
        self.stale_after, self.poll = stale_after, poll
        self.recovered_stale = False
        self._lock, self._beat, self._stop = None, None, threading.Event()

    def _holder(self) -> dict:
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _who(rec: dict) -> str:
        return f"pid {rec['pid']} on host {rec['host']}" if rec else "a process that has not recorded itself"

    def _touch(self) -> None:
        if self.mode == "file":
            os.utime(self.soft_path)
        self.record.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))

    def _take_over_if_stale(self) -> None:
        try:
            st, rec = os.stat(self.soft_path), self._holder()
        except FileNotFoundError:
            return
        dead, age = rec.get("host") == socket.gethostname() and not _pid_alive(rec["pid"]), time.time() - st.st_mtime
        if not dead and age <= self.stale_after:
            return
        # The record goes first (a lock file without one counts as alive until `stale_after`); then the
        # file is moved aside atomically, and put back if another waiter replaced it meanwhile.
        self.record.unlink(missing_ok=True)
        grave = self.soft_path.with_name(f"{self.soft_path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.soft_path, grave)
        except FileNotFoundError:
            return
        moved = os.stat(grave)
        if (moved.st_ino, moved.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
            self.recovered_stale = True
            print(f"rrwkv: took over the build lock {self.soft_path} from {self._who(rec)}, "
                  + ("which has exited" if dead else f"silent for {age:.0f} s"), file=sys.stderr, flush=True)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.soft_path)
        grave.unlink()

    def acquire(self) -> "BuildLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.mode == "auto":
            self.mode = "flock" if fcntl is None or _flock_works(self.path) else "file"
        soft = self.mode == "file"
        lock = filelock.SoftFileLock(str(self.soft_path)) if soft else filelock.FileLock(str(self.path))
        deadline, waiting = time.monotonic() + self.timeout, False
        while True:
            if soft:
                self._take_over_if_stale()
            try:
                lock.acquire(timeout=0)
                break
            except filelock.Timeout:
                pass
            who = self._who(self._holder())
            if time.monotonic() > deadline:
                raise TimeoutError(f"rrwkv: timed out after {self.timeout:.0f} s waiting for the kernel build lock "
                                   f"{lock.lock_file} held by {who}: let that build finish, or stop that process")
            if not waiting:
                print(f"rrwkv: waiting for the build lock {lock.lock_file} held by {who}", file=sys.stderr, flush=True)
                waiting = True
            time.sleep(self.poll)
        self._lock = lock
        self._touch()
        self._stop.clear()
        self._beat = threading.Thread(target=self._beating, name="rrwkv-build-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _beating(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):
                self._touch()                  # also puts back a record that a mistaken waiter removed

    def release(self) -> None:
        if self._lock is None:
            return
        self._stop.set()
        self._beat.join()
        self.record.unlink(missing_ok=True)      # first, so that a lock file without record is a fresh one
        self._lock.release()
        self._lock = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------------------- build
def _import_so(name: str, so: Path):
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_extension(name: str, sources: List[Path], build_root: Path, key: str,
                    extra_cflags=(), extra_cuda_cflags=(), needs_nvcc: bool = True,
                    verbose: bool = False, lock_timeout: float = 900.0, lock_mode: str = "auto"):
    """Build (once, under the lock) or import the cached torch extension `name`.

    The module is cached in build_root/name; `key` identifies the build (checked by the marker).
    Raises KernelBuildError with the compiler's output when the build fails.
    """
    build_dir = build_root / name
    marker = build_dir / "BUILD_OK"
    so = build_dir / f"{name}.so"

    def cached():
        try:
            return marker.read_text().strip() == key and so.exists()
        except OSError:
            return False

    if cached():
        try:
            return _import_so(name, so)
        except ImportError:
            pass                     # a broken .so: rebuild below
    if needs_nvcc and find_nvcc() is None:
        raise KernelBuildError(
            "rrwkv: cannot build the WKV CUDA kernel: nvcc (the CUDA compiler) was not found. Install the "
            "CUDA toolkit matching torch (torch.version.cuda = %s) and set CUDA_HOME, or run with the "
            "pure-PyTorch reference (config model.cuda_kernel=false, i.e. kernels.use_cuda_kernel(False))."
            % torch.version.cuda)
    if needs_nvcc:
        _ensure_cuda_home()
    build_root.mkdir(parents=True, exist_ok=True)
    with BuildLock(build_root / f"{name}.lock", timeout=lock_timeout, mode=lock_mode):
        if cached():                 # another process built it while we waited
            return _import_so(name, so)
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch's own FileBaton lock: a leftover from a killed build would make torch wait forever.
        (build_dir / "lock").unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        from torch.utils import cpp_extension
        try:
            mod = cpp_extension.load(name=name, sources=[str(s) for s in sources],
                                     extra_cflags=list(extra_cflags), extra_cuda_cflags=list(extra_cuda_cflags),
                                     build_directory=str(build_dir), verbose=verbose, with_cuda=needs_nvcc)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/CalledProcessError/OSError
            out = str(e)
            raise KernelBuildError(
                f"rrwkv: building the kernel extension {name} in {build_dir} failed. The compiler said:\n{out}\n"
                "To train without the CUDA kernel set model.cuda_kernel=false "
                "(kernels.use_cuda_kernel(False)).") from e
        marker.write_text(key + "\n")
        return mod


def arch_of_current_device() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def load_wkv_extension(dtype: torch.dtype, cache_dir: Optional[str] = None, verbose: bool = False):
    """The compiled WKV module for inputs of `dtype` on the current GPU (built on first use)."""
    if dtype not in DTYPE_IDS:
        raise KernelBuildError(f"rrwkv: the WKV CUDA kernel has no build for dtype {dtype}")
    arch = arch_of_current_device()
    src = csrc_dir(WKV_SOURCES + WKV_HEADERS)
    files = [src / f for f in WKV_SOURCES + WKV_HEADERS]
    cuda_flags = ["-O3", f"-DWKV_DTYPE={DTYPE_IDS[dtype]}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                  "-Xptxas=-O3"]
    if dtype != torch.float32:
        # 16-bit inputs: flush float32 denormals (below 1.2e-38) to zero, which drops the denormal
        # guards around every fast exponential and division (about 6 instructions a token).
        cuda_flags.append("-ftz=true")
    cflags = ["-O2"]
    key = source_hash(files, cuda_flags + cflags + [arch])
    name = f"rrwkv_wkv_{DTYPE_NAMES[dtype]}_sm{arch}_{key}"
    root = cache_root(cache_dir)
    with _load_lock:
        mod = _loaded.get(str(root / name))
        if mod is not None:
            return mod
        # Compile for this GPU only (TORCH_CUDA_ARCH_LIST may list several and cost minutes).
        old = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}"
        try:
            mod = build_extension(name, [src / f for f in WKV_SOURCES], root, key,
                                  extra_cflags=cflags, extra_cuda_cflags=cuda_flags, verbose=verbose)
        finally:
            if old is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old
        _loaded[str(root / name)] = mod
        return mod


def host_build_spec(dtype: torch.dtype):
    """(module name, source folder, key, compiler flags) of the CPU build for `dtype`; the name
    carries the hash of the sources, so each version of them is its own cached build."""
    if dtype not in DTYPE_IDS:
        raise KernelBuildError(f"rrwkv: the WKV kernel has no build for dtype {dtype}")
    src = csrc_dir(WKV_HOST_SOURCES + WKV_HEADERS)
    cflags = ["-O2", "-DWKV_HOST", f"-DWKV_DTYPE={DTYPE_IDS[dtype]}"]
    key = source_hash([src / f for f in WKV_HOST_SOURCES + WKV_HEADERS], cflags)
    return f"rrwkv_wkv_host_{DTYPE_NAMES[dtype]}_{key}", src, key, cflags


def load_wkv_host_extension(dtype: torch.dtype, cache_dir: Optional[str] = None, verbose: bool = False):
    """The kernels' arithmetic (csrc/wkv_algo.h) built for the CPU, for inputs of `dtype`.

    The same per-thread functions the CUDA kernels run, called in loops in the kernels' order
    (csrc/wkv_host.cpp): the tests check the kernel's algorithm against the float64 reference on
    machines without a GPU. Needs only the host C++ compiler. Slow: not a training path.
    """
    name, src, key, cflags = host_build_spec(dtype)
    root = cache_root(cache_dir)
    with _load_lock:
        mod = _loaded.get(str(root / name))
        if mod is None:
            mod = _loaded[str(root / name)] = build_extension(
                name, [src / f for f in WKV_HOST_SOURCES], root, key, extra_cflags=cflags,
                needs_nvcc=False, verbose=verbose)
        return mod
