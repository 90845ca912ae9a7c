"""Training checkpoints: DeepSpeed's model/optimizer/scheduler state plus every rank's data position and RNG.

DeepSpeed writes client state from rank 0 only, so each rank's stream state and RNG state are
gathered to rank 0 and stored as a list indexed by rank. A checkpoint is a DeepSpeed tag
directory `step{N}` under OUT_DIR/checkpoints; DeepSpeed's `latest` file names the newest one and
is written only after all of its files are, so a run killed mid-save resumes from the previous tag.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step(\d+)$")


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


def find_resume_dir(out_dir: Path, resume: str) -> Optional[Path]:
    """The checkpoint directory to resume from, or None for a fresh start."""
    ckpt = out_dir / "checkpoints"
    if resume == "none":
        if (ckpt / "latest").exists():
            raise FileExistsError(f"{ckpt} already holds checkpoints and run.resume=none; choose another "
                                  f"run.out_dir, or set run.resume=auto to continue that run")
        return None
    if resume == "auto":
        return ckpt if (ckpt / "latest").exists() else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"run.resume={resume}: no such checkpoint directory")
    if (path / "checkpoints" / "latest").exists():
        return path / "checkpoints"
    return path


def save(engine, ckpt_dir: Path, step: int, client: Dict[str, Any], per_rank: Dict[str, Any],
         keep_last: int) -> None:
    """Collective: every rank calls it. `per_rank` is this rank's own state (stream, RNG)."""
    ranks = gather_objects(per_rank)
    client = dict(client, step=step, ranks=ranks, world_size=len(ranks))
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client, save_latest=True)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        prune(ckpt_dir, keep_last)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one `latest` names)."""
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    tags = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))
    for _, path in tags[:-keep_last] if keep_last > 0 else []:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: Path, rank: int, world_size: int, model_config: Dict[str, Any]) -> Dict[str, Any]:
    """Load model/optimizer/scheduler; return the client state with this rank's entry as `mine`."""
    latest = ckpt_dir / "latest"
    tag = latest.read_text().strip() if latest.exists() else None
    if tag is None and TAG_RE.match(ckpt_dir.name):
        ckpt_dir, tag = ckpt_dir.parent, ckpt_dir.name
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint tag found in {ckpt_dir} (expected a 'latest' file or a step<N> "
                                f"directory); point run.resume at OUT_DIR or OUT_DIR/checkpoints/step<N>")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    if path is None or client is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded (incomplete or corrupt); delete that "
                           f"directory and point {ckpt_dir / 'latest'} at the previous step<N> to resume from it")
    saved_model = client.get("model_config")
    if saved_model is not None and saved_model != model_config:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was trained with model {saved_model}, but the config asks "
                         f"for {model_config}; use the same model.* settings or a new run.out_dir")
    if client.get("world_size") != world_size:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written by {client.get('world_size')} data-parallel ranks "
                         f"but this run has {world_size}; resume with the same number of processes")
    client["mine"] = client["ranks"][rank]
    return client


def merged_lanes(client: Dict[str, Any]) -> Dict[int, Any]:
    """Every lane's data position, from the entries of all ranks that wrote the checkpoint."""
    lanes: Dict[int, Any] = {}
    for entry in client["ranks"]:
        lanes.update(entry["lanes"])
    return lanes


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
