"""torch.compile of every block, WKV op included, as one graph (`model.compile: true`).

`Block.run` (pretrain/model.py) is the whole block after layer 0's ln0: layer norms, token shift
and mixes, the k/v/r projections, squeeze and excitation of the mediums, the WKV op, the output
projection, residuals, channel-mix with its squared ReLU and excitation gate. It is compiled once
(`fullgraph=True`: a graph break is an error, not a silent fall-back to eager) and shared by every
block, so a model of any depth compiles one graph (two with its backward). The WKV op enters the
graph as the torch.library custom ops `rrwkv::wkv_forward` / `rrwkv::wkv_backward`
(kernels/cuda.py): inductor calls the CUDA kernel as it is, with its own autograd formula and build
cache, and fuses the elementwise work on both sides of it (on the CPU the op is the kernels'
arithmetic built for the host). One graph a block instead of two regions around an eager op halves
the compiled calls (each a Python wrapper on the host) of a step. A block with a carried state
(chunked evaluation, generation) runs eagerly.

Under ZeRO-3 each Block is one ZeRO-3 "leaf" module (pretrain/engine.py): its parameters are
gathered together when the block starts, so no DeepSpeed hook (a graph break) runs inside a
compiled region.
"""
from __future__ import annotations

import torch

from .model import Block

_compiled = None


def inductor_settings() -> None:
    """Inductor settings for every compiled block (RRWKV's and the SDPA baseline's).

    Mix-order reductions (inductor's fusion of a row reduction, such as a layer norm's backward, with
    the column reductions of parameter gradients over all tokens; on by default on GPUs since torch
    2.10) are turned off: upstream they give silently wrong gradients for norm-weight patterns once
    the reduction spans about 16k tokens (pytorch/pytorch#193061) and wrongly
    shaped ones for norm-like code (#178080), and on an H100 (torch 2.11, 2026-11-27) the compiled
    1.5B block's backward failed with "CompiledFunctionBackward returned an invalid gradient ... got
    [2048] but expected shape compatible with [1, 1, 2048]" (a time-mix curve) with them on.
    """
    import torch._inductor.config as inductor
    if hasattr(inductor, "triton") and hasattr(inductor.triton, "mix_order_reduction"):
        inductor.triton.mix_order_reduction = False


def compiled_block():
    """The compiled Block.run, made on first use (compilation itself is lazy)."""
    global _compiled
    if _compiled is None:
        inductor_settings()
        _compiled = torch.compile(Block.run, fullgraph=True)
    return _compiled


def compile_blocks(model: torch.nn.Module) -> int:
    """Run every Block inside `model` (an RRWKV or a pipeline stage) through the compiled regions.
    Returns the number of blocks."""
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            m.compiled = compiled_block()
            n += 1
    # The blocks share the graph (Dynamo inlines the module calls and guards on what they hold, not
    # on which block it is: 12 blocks, 1 graph on torch 2.13). Should a torch version
    # guard each block apart, let it compile them all rather than fall back to eager after its
    # default 8 entries.
    import torch._dynamo.config as dynamo
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, key):
            setattr(dynamo, key, max(getattr(dynamo, key), n + 8))
    return n
