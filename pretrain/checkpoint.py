"""Training checkpoints: DeepSpeed's model/optimizer/scheduler state plus every rank's data position and RNG.

DeepSpeed writes client state from rank 0 only, so each rank's data position (its lanes) and RNG
state are gathered and stored as a list indexed by rank. A checkpoint is a DeepSpeed tag
directory `step{N}` under OUT_DIR/checkpoints. The `latest` file naming the newest tag is
replaced atomically (write + rename) only after every rank has finished writing its files, so a
run killed mid-save resumes from the previous tag, and a torn `step{N}` is never loaded.
Loading goes through DeepSpeed's loader, which unpickles its own files (torch.load with
weights_only=False): load checkpoints only from sources you trust.

`Saver` is what the training loop calls: synchronous saves (`save` below), or asynchronous ones
(train.async_save) whose files a background thread writes from a host-memory copy of the state.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import random
import re
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError
from .weights import new_file_mode

TAG_RE = re.compile(r"^step(\d+)$")
SIDECAR = "rrwkv.json"  # our metadata of a tag; written last, so a tag without it is incomplete


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def step_dirs(ckpt_dir: Path) -> List[Path]:
    """The step<N> directories of ckpt_dir, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return [p for _, p in sorted(tags)]


def complete_tags(ckpt_dir: Path) -> List[Path]:
    """The complete step<N> directories (with SIDECAR) of ckpt_dir, oldest first."""
    return [p for p in step_dirs(ckpt_dir) if (p / SIDECAR).is_file()]


def _resume_point(ckpt: Path, say: Callable[[str], None]) -> Optional[Path]:
    """ckpt when its `latest` names a complete checkpoint; else the newest complete step<N>, or None
    where there is no step<N> at all. A run never starts over where checkpoints exist."""
    latest, named = ckpt / "latest", None
    if latest.is_file():
        try:
            named = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named and TAG_RE.match(named) and (ckpt / named / SIDECAR).is_file():
            return ckpt
    tags = complete_tags(ckpt)
    if tags:
        why = f"{latest} names {named!r}, not a complete checkpoint" if latest.exists() else f"{latest} is missing"
        say(f"warning: {why}; resuming from the newest complete checkpoint, {tags[-1]}")
        return tags[-1]
    torn = [p.name for p in step_dirs(ckpt)]
    if torn:
        raise UserError(f"{ckpt} holds {', '.join(torn)} but no complete checkpoint (a step<N> with {SIDECAR}); "
                        f"move those aside to start over in this run.out_dir, or choose another one")
    return None


def find_resume_dir(out_dir: Path, resume: str, say: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint directory (OUT_DIR/checkpoints, or a step<N> in it) to resume from, or None
    for a fresh start."""
    ckpt = out_dir / "checkpoints"
    if resume == "none":
        if (ckpt / "latest").exists() or complete_tags(ckpt):
            raise FileExistsError(f"{ckpt} already holds checkpoints and run.resume=none; choose another "
                                  f"run.out_dir, or set run.resume=auto to continue that run")
        return None
    if resume == "auto":
        return _resume_point(ckpt, say)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"run.resume={resume}: no such checkpoint directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if TAG_RE.match(path.name):
        return path
    point = _resume_point(path, say)
    if point is None:
        raise UserError(f"run.resume={resume}: no checkpoint in {path}; point it at OUT_DIR, OUT_DIR/checkpoints "
                        f"or OUT_DIR/checkpoints/step<N>")
    return point


def save(engine, ckpt_dir: Path, step: int, client: Dict[str, Any], per_rank: Dict[str, Any],
         keep_last: int) -> None:
    """Collective: every rank calls it. `per_rank` is this rank's own state (stream, RNG)."""
    ranks = gather_objects(per_rank)
    client = dict(client, step=step, ranks=ranks, world_size=len(ranks))
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    fault_delay = float(os.environ.get("RRWKV_FAULT_SAVE_DELAY_S", "0"))  # tests: a window to kill a save in
    if fault_delay:
        time.sleep(fault_delay)
    if engine.global_rank == 0:  # written last: a tag without it is incomplete
        write_atomic(ckpt_dir / tag / SIDECAR, json.dumps(
            {"step": step, "world_size": len(ranks), "dp_size": engine.dp_world_size,
             "zero_stage": engine.zero_optimization_stage(), "model_config": client.get("model_config")}))
    fault_delay = float(os.environ.get("RRWKV_FAULT_SAVE_DELAY_S", "0"))  # tests: a window to kill a save in
    if fault_delay:
        time.sleep(fault_delay)
    if engine.global_rank == 0:
        write_atomic(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    if dist.is_initialized():
        dist.barrier()


def host_copy(obj: Any, memo: Optional[Dict[Any, Any]] = None) -> Any:
    """`obj` (a state dict: dicts, lists, tuples, tensors, plain objects) with every tensor copied to host
    memory: nothing training does afterwards can change the copy. Tensors that share a storage share
    its copy (torch.save writes whole storages, so the files are the ones the originals give);
    other objects are deep-copied."""
    memo = {} if memo is None else memo           # by id(), as copy.deepcopy's: what is shared stays shared
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = memo[id(obj)] = _host_tensor(obj, memo)
    elif isinstance(obj, (dict, list)):
        out = memo[id(obj)] = copy.copy(obj)       # the same container type (OrderedDict, ...)
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            out[k] = host_copy(v, memo)
    elif isinstance(obj, tuple):
        items = [host_copy(v, memo) for v in obj]
        out = memo[id(obj)] = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
    else:
        return copy.deepcopy(obj, memo)
    memo.setdefault(id(memo), []).append(obj)      # keeps obj alive, so that its id() is not reused meanwhile
    return out


def _host_tensor(t: torch.Tensor, memo: Dict[Any, Any]) -> torch.Tensor:
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized:
        return copy.deepcopy(t.detach(), memo).to("cpu")
    storage = t.untyped_storage()
    key = ("storage", storage.device, storage.data_ptr(), storage.nbytes())
    host = memo.get(key)
    if host is None:
        host = memo[key] = storage.clone() if storage.device.type == "cpu" else storage.cpu()
    out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
    return torch.nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else out


class _CopyingEngine:
    """Stands in for DeepSpeed's checkpoint engine (deepspeed/runtime/checkpoint_engine) while saves are
    asynchronous: `save` copies a state dict to host memory and keeps it, for the Saver's thread to
    write through DeepSpeed's own engine (`inner`). Everything else is `inner`'s."""

    def __init__(self, inner):
        self.inner, self.copies = inner, []
        self.name = f"{getattr(inner, 'name', type(inner).__name__)} (asynchronous)"

    def __getattr__(self, name):                 # makedirs, load, is_data_parallel_writer, ...
        return getattr(self.inner, name)

    def create(self, info) -> None:
        self.inner.create(info)

    def save(self, state_dict, path: str) -> None:
        self.copies.append((host_copy(state_dict), path))

    def commit(self, info) -> bool:              # the Saver commits, once every rank's files are written
        return True

    def is_decoupled(self) -> bool:
        return False

    def take(self) -> list:
        copies, self.copies = self.copies, []
        return copies


class Saver:
    """The training loop's checkpoints. Every rank calls `save` (collective) and `wait` before it exits.

    Synchronous (the default): `save` returns once `latest` names the new checkpoint.
    Asynchronous (`async_save`): `save` copies this rank's state to host memory (DeepSpeed's checkpoint
    engine replaced by `_CopyingEngine`) and returns; a thread writes the files through DeepSpeed's
    engine; once every rank's thread is done (an all-reduce on a gloo group of its own, so it never
    interleaves with training's collectives) rank 0 writes SIDECAR and `latest` and prunes. One save is
    in flight at a time: `save` waits for the previous one first. A crash before the commit leaves
    `latest` and its checkpoint as they were.
    """

    def __init__(self, engine, ckpt_dir: Path, keep_last: int, async_save: bool,
                 say: Callable[[str], None] = print, timeout_minutes: float = 30.0):
        self.engine, self.ckpt_dir, self.keep_last, self.async_save, self.say = \
            engine, ckpt_dir, keep_last, async_save, say
        self._stats: Dict[str, Any] = {}          # of the newest save, for the metrics rows
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self._committed: Optional[int] = None     # the step `latest` names after this run's newest save
        self._group = None
        if not async_save:
            return
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
        if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
            raise UserError(f"train.async_save=true writes checkpoints through DeepSpeed's default checkpoint "
                            f"engine, but this run configures {type(engine.checkpoint_engine).__name__}; remove "
                            f"parallel.deepspeed.checkpoint.writer (or datastates), or set train.async_save=false")
        engine.checkpoint_engine = _CopyingEngine(engine.checkpoint_engine)
        if dist.is_initialized() and dist.get_world_size() > 1:     # collective: every rank makes it
            self._group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))

    def stats(self) -> Dict[str, Any]:
        """The newest save's timings for the metrics rows: save_s and checkpoint_gb; asynchronous saves
        add save_block_s (the training time it cost), save_wait_s (of that, waiting for the previous
        save) and, once written, save_write_s (writing and committing in the background)."""
        with self._lock:
            return dict(self._stats)

    def save(self, step: int, client: Dict[str, Any], per_rank: Dict[str, Any]) -> None:
        """Collective. `client` is the run's state (saved once), `per_rank` this rank's (stream, RNG)."""
        if not self.async_save:
            t = time.perf_counter()
            save(self.engine, self.ckpt_dir, step, client, per_rank, self.keep_last)
            with self._lock:
                self._stats = {"save_s": round(time.perf_counter() - t, 3),    # the training time a save costs
                               "checkpoint_gb": round(size_gb(self.ckpt_dir / f"step{step}"), 3)}
            self.say(f"saved checkpoint step{step}: {self._stats['checkpoint_gb']} GB in {self._stats['save_s']} s")
            return
        t0 = time.perf_counter()
        busy = self._thread is not None and self._thread.is_alive()
        waited = self.wait()
        if busy:
            self.say(f"waited {waited:.3f} s for checkpoint step{self._committed} to be written before saving "
                     f"step{step}")
        if step == self._committed:               # (data ran out right after a save): it is saved already
            return
        t1 = time.perf_counter()
        ranks = gather_objects(per_rank)
        client = dict(client, step=step, ranks=ranks, world_size=len(ranks))
        tag = f"step{step}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        copies = self.engine.checkpoint_engine.take()
        meta = {"step": step, "world_size": len(ranks), "dp_size": self.engine.dp_world_size,
                "zero_stage": self.engine.zero_optimization_stage(), "model_config": client.get("model_config")}
        t2 = time.perf_counter()
        block = t2 - t0
        with self._lock:
            self._stats = {"save_block_s": round(block, 3), "save_wait_s": round(waited, 3)}
        self.say(f"checkpoint step{step}: copied to host memory in {t2 - t1:.3f} s; writing it in the background")
        self._thread = threading.Thread(target=self._write, args=(tag, copies, meta, t1, block),
                                        name=f"rrwkv-save-{tag}")   # not a daemon: the process waits for it
        self._thread.start()

    def wait(self) -> float:
        """Block until the save in flight (if any) is committed; its seconds. Raises UserError where it
        could not be written (the previous checkpoint stays `latest`)."""
        t = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error:
            error, self._error = self._error, None
            raise UserError(error)
        return time.perf_counter() - t

    def _all(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on every rank (this Saver's own group)."""
        if self._group is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._group)
        return bool(t.item())

    def _write(self, tag: str, copies: list, meta: Dict[str, Any], t1: float, block: float) -> None:
        """The background thread: write this rank's files, then commit them together with every rank's."""
        t = time.perf_counter()
        error = None
        try:
            while copies:
                state, path = copies.pop(0)       # freed as written
                self.engine.checkpoint_engine.inner.save(state, path)
                del state
        except Exception as e:                    # (a full disk, a quota): the run stops at its next wait
            error = f"{type(e).__name__}: {e}"
        fault_delay = float(os.environ.get("RRWKV_FAULT_SAVE_DELAY_S", "0"))  # tests: a window to kill a save in
        if fault_delay:
            time.sleep(fault_delay)
        committed = False
        try:
            written = self._all(error is None)    # every rank's files are complete
            if written and self.engine.global_rank == 0:
                try:
                    write_atomic(self.ckpt_dir / tag / SIDECAR, json.dumps(meta))   # last: the tag is complete
                    write_atomic(self.ckpt_dir / "latest", tag)
                    prune(self.ckpt_dir, self.keep_last)
                    committed = True
                except OSError as e:
                    error = f"{type(e).__name__}: {e}"
            committed = self._all(committed or self.engine.global_rank != 0)
        except Exception as e:                    # a rank died: its peers' collective fails
            error = error or f"{type(e).__name__}: {e}"
        if not committed:
            self._error = (f"checkpoint {self.ckpt_dir / tag} could not be written ({error or 'another rank failed'}); "
                           f"`latest` still names the checkpoint before it, if any; fix the cause (e.g. free disk "
                           f"space) and start the run again to resume from there")
            return
        now = time.perf_counter()
        self._committed = meta["step"]
        gb = round(size_gb(self.ckpt_dir / tag), 3)
        with self._lock:
            self._stats.update(save_s=round(now - t1, 3), save_write_s=round(now - t, 3), checkpoint_gb=gb)
        self.say(f"saved checkpoint {tag}: {gb} GB in {now - t1:.3f} s ({block:.3f} s blocking training, "
                 f"{now - t:.3f} s written in the background)")


def size_gb(path: Path) -> float:
    """The bytes under `path` (a checkpoint tag), in GB; 0 where this rank cannot see it."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9 if path.is_dir() else 0.0


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one `latest` names)."""
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    tags = step_dirs(ckpt_dir)
    for path in tags[:-keep_last] if keep_last > 0 else []:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: Path, rank: int, dp_size: int, model_config: Dict[str, Any]) -> Dict[str, Any]:
    """Load model/optimizer/scheduler; return the client state with this rank's entry as `mine`.

    A checkpoint written by another number of data-parallel ranks is converted once to DeepSpeed's
    universal format (`step<N>_universal`, beside it) and loaded from there.
    """
    latest = ckpt_dir / "latest"
    tag = latest.read_text().strip() if latest.exists() else None
    if tag is None and TAG_RE.match(ckpt_dir.name):
        ckpt_dir, tag = ckpt_dir.parent, ckpt_dir.name
    if tag is None or not (ckpt_dir / tag / SIDECAR).is_file():
        raise FileNotFoundError(f"no complete checkpoint found in {ckpt_dir} (expected a 'latest' file naming a "
                                f"step<N> directory with {SIDECAR}); point run.resume at OUT_DIR or "
                                f"OUT_DIR/checkpoints/step<N>")
    meta = json.loads((ckpt_dir / tag / SIDECAR).read_text())
    if meta["model_config"] != model_config:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was trained with model {meta['model_config']}, but the "
                         f"config asks for {model_config}; use the same model.* settings or a new run.out_dir")
    load_tag = tag
    if meta["dp_size"] != dp_size and engine.zero_optimization_stage() > 0:
        load_tag = to_universal(ckpt_dir, tag, rank)
        engine._config.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_module_strict=True)
    except (AssertionError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError) as e:
        raise UserError(f"checkpoint {ckpt_dir / tag} could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'}); move that directory aside to "
                        f"resume from the newest complete checkpoint before it") from None
    if path is None or client is None:
        raise UserError(f"checkpoint {ckpt_dir / tag} could not be loaded (incomplete or corrupt); move that "
                        f"directory aside to resume from the newest complete checkpoint before it")
    ranks = client["ranks"]
    client["mine"] = ranks[rank] if rank < len(ranks) else ranks[0]
    return client


def to_universal(ckpt_dir: Path, tag: str, rank: int) -> str:
    """Convert ckpt_dir/tag to DeepSpeed's universal checkpoint (once; rank 0 converts, others wait)."""
    out = f"{tag}_universal"
    done = ckpt_dir / out / SIDECAR
    if rank == 0 and not done.exists():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        shutil.rmtree(ckpt_dir / out, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(ckpt_dir / out),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True)
        ds_to_universal(args)
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # ours is `latest`; theirs would confuse
        shutil.copy(ckpt_dir / tag / SIDECAR, done)
    if dist.is_initialized():
        dist.barrier()
    return out


def merged_lanes(client: Dict[str, Any]) -> Dict[int, Any]:
    """Every lane's data position, from the entries of all ranks that wrote the checkpoint."""
    lanes: Dict[int, Any] = {}
    for entry in client["ranks"]:
        lanes.update(entry["lanes"])
    return lanes


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it), in the mode a new file gets."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, new_file_mode())      # a .tmp left by a killed writer keeps the mode it was made with
    os.replace(tmp, path)
