"""Training checkpoints: DeepSpeed's model/optimizer/scheduler state plus every rank's data position and RNG.

DeepSpeed writes client state from rank 0 only, so each rank's data position (its lanes) and RNG
state are gathered and stored as a list indexed by rank. A checkpoint is a DeepSpeed tag
directory `step{N}` under OUT_DIR/checkpoints. The `latest` file naming the newest tag is
replaced atomically (write + rename) only after every rank has finished writing its files, so a
run killed mid-save resumes from the previous tag, and a torn `step{N}` is never loaded.
Loading goes through DeepSpeed's loader, which unpickles its own files (torch.load with
weights_only=False): load checkpoints only from sources you trust.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
import time
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
