"""torch.compile of everything in a block but the WKV op (`model.compile: true`).

Each Block runs as two regions around the WKV op (pretrain/model.py, `before_wkv` and
`after_wkv`): layer norms, token shift and mixes, the k/v/r projections, squeeze and excitation
of the mediums; then the output projection, residuals, channel-mix with its squared ReLU and
excitation gate. Those two functions are compiled once (`fullgraph=True`: a graph break is an
error, not a silent fall-back to eager) and shared by every block, so a model of any depth compiles
two graphs (four with their backward); the WKV op stays an eager call between them, so the CUDA
kernel, its autograd and its build cache are untouched. A block with a carried state (chunked
evaluation, generation) runs eagerly.

Under ZeRO-3 each Block is one ZeRO-3 "leaf" module (pretrain/engine.py): its parameters are
gathered together when the block starts, so no DeepSpeed hook (a graph break) runs inside a
compiled region.
"""
from __future__ import annotations

import torch

from .model import Block

_regions = None


def compiled_regions():
    """The compiled (before_wkv, after_wkv) pair, made on first use (compilation itself is lazy)."""
    global _regions
    if _regions is None:
        _regions = (torch.compile(Block.before_wkv, fullgraph=True),
                    torch.compile(Block.after_wkv, fullgraph=True))
    return _regions


def compile_blocks(model: torch.nn.Module) -> int:
    """Run every Block inside `model` (an RRWKV or a pipeline stage) through the compiled regions.
    Returns the number of blocks."""
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            m.compiled = compiled_regions()
            n += 1
    # The blocks share the two graphs (Dynamo inlines the module calls and guards on what they
    # hold, not on which block it is: 12 blocks, 2 graphs on torch 2.13). Should a torch version
    # guard each block apart, let it compile them all rather than fall back to eager after its
    # default 8 entries.
    import torch._dynamo.config as dynamo
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, key):
            setattr(dynamo, key, max(getattr(dynamo, key), n + 8))
    return n
