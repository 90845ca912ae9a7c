#!/usr/bin/env python
"""Per-GPU memory of a training layout, estimated without a GPU (for planning GPU runs).

    python benchmarks/memory_estimate.py --gpus 4 --config configs/tiny.yaml --config configs/model/7b.yaml \\
        data.seq_len=4096 data.micro_batch_size=1 train.precision=bf16 parallel.zero_stage=3 \\
        train.activation_checkpointing=true [--json FILE]

Model states come from the parameter count and the layout, in bytes per parameter (bf16 training
as DeepSpeed runs it here, `data_types.grad_accum_dtype = fp32`):

| state | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |
|---|---|---|---|---|
| bf16 weights | 2 | 2 | 2 | 2/dp (+ the gathered blocks) |
| bf16 gradients | 2 | 2 | buckets | buckets |
| fp32 gradients | 4 | 4 | 4/dp | 4/dp |
| fp32 master weights + Adam m, v | 12 | 12/dp | 12/dp | 12/dp |

(ZeRO-1 keeps full fp32 gradients: counted as DeepSpeed's BF16 optimizer holds them, the larger
case. fp32 training: 4 weights + 4 gradients + 8 Adam, partitioned the same way.) With
`parallel.offload=optimizer` the fp32 parts live in CPU memory, with `offload=all` the weights too;
both are reported as CPU memory. Buckets: a reduce and an all-gather bucket of
`parallel.bucket_size` elements in the compute dtype; ZeRO-3 adds the prefetch bucket and two
gathered blocks (the running one and the next).

Activations are measured, not modelled: the full-size model runs one forward, loss and backward on
fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no memory), while a dispatch mode
adds up the bytes of the tensors alive at each moment and keeps the peak. Parameter gradients are
dropped as soon as they are accumulated (ZeRO hands them to its buckets; they are counted above).
The WKV op runs as a stand-in with the CUDA op's memory (it saves k, v, mk, mv and its fp32 chunk
states, 3 x B x ceil(T/64) x C for tokens and 3 x B x J x C for mediums; its backward allocates
the kernel's fp32 workspaces), because on CPU tensors the real op is the reference, which saves
other things. The measured peak is eager PyTorch's (torch.compile's partitioner usually saves
less). Pipeline stages: each stage's blocks' saved activations times the micro-batches in flight
(DeepSpeed's 1F1B keeps min(P - stage, m) buffers), plus one block's backward and, on the last
stage, the head and loss. Not counted: the CUDA context and cuBLAS/NCCL workspaces (about 1-3 GB
a GPU), allocator fragmentation (often 5-15%); leave that headroom.
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path


import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive; and their peak.
    Storages of `existing` tensors (the parameters) are not counted, nor are views of them."""

    def __init__(self, existing=()):
        super().__init__()
        self.seen, self.now, self.peak = {t.untyped_storage()._cdata for t in existing}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t.untyped_storage())
        return out

    def track(self, storage) -> None:
        key = storage._cdata
        if key in self.seen:
            return
        self.seen.add(key)
        n = storage.nbytes()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self.free, key, n)

    def free(self, key, n) -> None:
        self.seen.discard(key)
        self.now -= n


class WKVMemory(torch.autograd.Function):
    """The CUDA WKV op's memory (kernels/csrc/wkv.cpp), for the estimate only: y like k; saves its
    inputs (the mediums converted to fp32) and the fp32 token and medium chunk states; backward
    allocates its fp32 workspaces and the input gradients."""

    @staticmethod
    def forward(ctx, k, v, mk, mv):
        B, T, C = k.shape
        nc = -(-T // 64)
        J = 0 if mk is None else mk.shape[1]
        f32 = dict(dtype=torch.float32, device=k.device)
        cs, ms = torch.empty(3, B, nc, C, **f32), torch.empty(3, B, J, C, **f32)
        mediums = () if mk is None else (mk.float(), mv.float())
        ctx.medium_dtype = None if mk is None else mk.dtype
        ctx.save_for_backward(k, v, cs, ms, *mediums)
        return torch.empty_like(k)

    @staticmethod
    def backward(ctx, gy):
        k, v, cs, ms, *mediums = ctx.saved_tensors
        B, T, C = k.shape
        nc = cs.shape[2]
        f32 = dict(dtype=torch.float32, device=k.device)
        work = [torch.empty(3, B, nc, C, **f32), torch.empty(2, B, nc, C, **f32), torch.empty(3, B, nc * 8, C, **f32)]
        grads = (torch.empty_like(k), torch.empty_like(v))
        if mediums:
            grads += tuple(torch.empty_like(m, dtype=ctx.medium_dtype) for m in mediums)
        else:
            grads += (None, None)
        del work
        return grads


def wkv_memory(self, k, v, mk, mv, st):
    from rrwkv.kernels.wkv import WKVState
    B, T, C = k.shape
    zeros = lambda: k.new_zeros(B, C, dtype=torch.float32)  # noqa: E731
    return WKVMemory.apply(k, v, mk, mv), WKVState(zeros(), zeros(), zeros())


def measure_activations(mcfg, dtype, micro_batch: int, seq_len: int, checkpointing: bool, l2wrap: bool,
                        fake: bool = True):
    """Peak live bytes of one forward + loss + backward, and the bytes saved by the blocks after forward.
    fake=False runs on real CPU tensors (tests compare the two on a small model)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from rrwkv.pretrain.loss import lm_loss
    from rrwkv.pretrain.model import RRWKV, TimeMix
    real_wkv = TimeMix.wkv
    TimeMix.wkv = wkv_memory
    try:
        default = torch.get_default_dtype()
        with FakeTensorMode() if fake else contextlib.nullcontext():
            torch.set_default_dtype(dtype)   # parameters made in the compute dtype (fake tensors cannot be converted)
            try:
                model = RRWKV(mcfg, init_seed=None).train()
            finally:
                torch.set_default_dtype(default)
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
            idx = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            with LiveBytes(existing=list(model.parameters()) + list(model.buffers())) as live:
                x = model.emb(idx)
                for block in model.blocks:
                    if checkpointing:
                        x = torch.utils.checkpoint.checkpoint(lambda x_, b=block: b(x_)[0], x, use_reentrant=False)
                    else:
                        x = block(x)[0]
                blocks_saved = live.now
                loss = lm_loss(model.head(model.ln_out(x)), idx, l2wrap)
                del x
                loss.backward()
            return live.peak, blocks_saved
    finally:
        TimeMix.wkv = real_wkv


def stage_layers(mcfg, stages: int, method: str):
    """The layers of each pipeline stage (embedding, blocks, head), as DeepSpeed partitions them."""
    from deepspeed.runtime import utils as ds_utils

    from rrwkv.pretrain.metrics import count_params
    C, V = mcfg.n_embd, mcfg.vocab_size
    block = (count_params(mcfg, non_embedding=True) - 2 * C) // mcfg.n_layer
    counts = [V * C] + [block] * mcfg.n_layer + [V * C + 2 * C]
    if method == "uniform":
        parts = ds_utils.partition_uniform(len(counts), stages)
    elif method == "parameters":
        parts = ds_utils.partition_balanced(counts, stages)
    else:   # type:BlockPipe
        parts = ds_utils.partition_balanced([0] + [1] * mcfg.n_layer + [0], stages)
    return [(int(parts[s]), int(parts[s + 1]), int(sum(counts[parts[s]:parts[s + 1]]))) for s in range(stages)], block


def estimate(cfg, gpus: int):
    from rrwkv.pretrain.metrics import count_params
    from rrwkv.pretrain.config import model_config
    mcfg = model_config(cfg)
    P, stage, offload = cfg.parallel.pipeline_stages, cfg.parallel.zero_stage, cfg.parallel.offload
    if gpus % P:
        raise SystemExit(f"--gpus {gpus} is not a multiple of parallel.pipeline_stages {P}")
    dp = gpus // P
    prec = cfg.train.precision
    w = 4 if prec == "fp32" else 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    M, T = cfg.data.micro_batch_size, cfg.data.seq_len
    gbs = cfg.train.global_batch_size or M * dp
    m = gbs // (M * dp)
    N = count_params(mcfg)
    stages, block = stage_layers(mcfg, P, cfg.parallel.partition_method) if P > 1 else ([(0, mcfg.n_layer + 2, N)], None)
    if block is None:
        block = (count_params(mcfg, non_embedding=True) - 2 * mcfg.n_embd) // mcfg.n_layer
    peak, blocks_saved = measure_activations(mcfg, dtype, M, T, cfg.train.activation_checkpointing, cfg.train.l2wrap)
    per_block = blocks_saved / mcfg.n_layer
    bucket = cfg.parallel.bucket_size * w
    rows = []
    for s, (lo, hi, n) in enumerate(stages):
        fp32_extra = 0 if prec == "fp32" else 4              # master weights (bf16/fp16 training)
        opt = (8 + fp32_extra) * n                           # Adam m, v (+ master)
        grads32 = 4 * n
        if prec == "bf16" and cfg.train.grad_accum_dtype == "bf16" and stage == 1:
            # accumulated in bf16 (DeepSpeed's ZeRO-1 optimizer, not its BF16 optimizer): the full bf16
            # gradients, and the fp32 gradients of this rank's partition only
            weights, grads, opt = w * n, w * n + grads32 / dp, opt / dp
        elif stage == 0:
            weights, grads = w * n, (w * n if prec != "fp32" else 0) + grads32
        elif stage == 1:
            weights, grads, opt = w * n, (w * n if prec != "fp32" else 0) + grads32, opt / dp
        elif stage == 2:
            weights, grads, opt = w * n, grads32 / dp, opt / dp
        else:
            weights, grads, opt = w * n / dp, grads32 / dp, opt / dp
        cpu = 0.0
        if offload in ("optimizer", "all"):
            cpu += opt + grads
            opt, grads = 0.0, (w * n / dp if stage >= 2 else w * n)   # the compute-dtype gradients stay
        if offload == "all":
            cpu += weights
            weights = 0.0
        buckets = 0.0 if stage == 0 else 2 * bucket
        if stage == 3:
            buckets += 2 * block * w + cfg.parallel.prefetch_bucket_size * w
        if P == 1:
            act = peak
        else:
            blocks = max(0, min(hi, mcfg.n_layer + 1) - max(lo, 1))
            inflight = max(2, min(P - s, m))
            act = blocks * per_block * inflight + 2 * per_block
            if hi == mcfg.n_layer + 2:   # last stage: the head and the loss, one micro-batch at a time
                act += max(0.0, peak - blocks_saved)
            act += 2 * M * T * mcfg.n_embd * w * inflight   # activations sent/received between stages
        total = weights + grads + opt + buckets + act
        rows.append({"stage": s, "layers": [lo, hi], "params": n, "weights_gb": weights / GiB, "grads_gb": grads / GiB,
                     "optimizer_gb": opt / GiB, "buckets_gb": buckets / GiB, "activations_gb": act / GiB,
                     "total_gb": total / GiB, "cpu_gb_per_rank": cpu / GiB})
    return {"gpus": gpus, "data_parallel": dp, "pipeline_stages": P, "zero_stage": stage, "offload": offload,
            "precision": prec, "micro_batch": M, "seq_len": T, "micro_batches_per_step": m,
            "activation_checkpointing": cfg.train.activation_checkpointing, "params": N,
            "measured_peak_activations_gb": peak / GiB, "saved_per_block_gb": per_block / GiB,
            "per_gpu": rows, "max_total_gb": max(r["total_gb"] for r in rows),
            "cpu_gb_all_ranks": sum(r["cpu_gb_per_rank"] for r in rows) * dp}


def main(argv):
    p = argparse.ArgumentParser(prog="benchmarks/memory_estimate.py", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, required=True, help="processes (GPUs) of the layout")
    # layers: 0 is the embedding, 1..n_layer the blocks, n_layer + 1 the head (pipeline stages)
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    from rrwkv.pretrain.config import load_config
    cfg = load_config(args.config, args.overrides)
    r = estimate(cfg, args.gpus)
    print(f"{r['params'] / 1e9:.2f}B parameters, {args.gpus} GPUs ({r['data_parallel']} data-parallel x "
          f"{r['pipeline_stages']} stages), ZeRO-{r['zero_stage']}, offload {r['offload']}, {r['precision']}, "
          f"micro-batch {r['micro_batch']} x {r['seq_len']}, {r['micro_batches_per_step']} micro-batches per step, "
          f"activation checkpointing {r['activation_checkpointing']}")
    print(f"{'stage':>5}{'layers':>9}{'weights':>9}{'grads':>8}{'optim':>8}{'buckets':>9}{'activ.':>9}{'total GiB':>11}{'CPU GiB/rank':>14}")
    for row in r["per_gpu"]:
        print(f"{row['stage']:>5}{'%d-%d' % (row['layers'][0], row['layers'][1] - 1):>9}{row['weights_gb']:>9.1f}{row['grads_gb']:>8.1f}{row['optimizer_gb']:>8.1f}"
              f"{row['buckets_gb']:>9.1f}{row['activations_gb']:>9.1f}{row['total_gb']:>11.1f}{row['cpu_gb_per_rank']:>14.1f}")
    print(f"measured peak of forward+backward (one micro-batch, no model states): {r['measured_peak_activations_gb']:.2f} GiB; "
          f"saved per block after forward: {r['saved_per_block_gb']:.3f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
