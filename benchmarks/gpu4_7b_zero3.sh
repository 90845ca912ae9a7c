#!/usr/bin/env bash
# Runbook (c), FOUR H100s: the 7B RRWKV (configs/model/7b.yaml, 7.53B parameters) with ZeRO-3
# over 4 data-parallel ranks (parameters created partitioned, zero.Init), ctx 4096, bf16: tokens/s,
# TFLOP/s and MFU per GPU, peak memory of every rank, time per phase.
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu4_7b_zero3.sh
#   COMPILE=true ...   with model.compile=true
#
# Time (planned): 1-2 min start-up (zero.Init and the seeded init of 34 parts, QR on the GPU),
# 9 steps of 2-3 s; 3-4 min. If the first layout runs out of memory, the second runs after it.
# Memory per GPU (benchmarks/memory_estimate.py, eager, bf16; about 78 GiB usable):
#   7b_zero3 (micro-batch 1 x 4096, 4 micro-batches a step, 64k tokens, no recompute):
#     weights 3.5 (1/4) + fp32 gradients 7.0 + master and Adam 21.0 + buckets and two gathered
#     blocks 2.8 + activations 28.1 = 62.5 GiB (+ CUDA context, NCCL, fragmentation: tight but in).
#   7b_zero3_recompute (fallback; micro-batch 2, 2 micro-batches a step, activation checkpointing):
#     3.5 + 7.0 + 21.0 + 2.8 + 7.5 = 41.8 GiB.
source "$(dirname "$0")/runbook.sh"
report_env
N=$(gpus 4)
T=$(seqlen 4096)
args=(--config configs/model/7b.yaml data.seq_len="$T" parallel.zero_stage=3 model.compile="${COMPILE:-false}"
      train.global_batch_size=16)
opts=(--no-sdpa --warmup 2 --steps 5 --phase-steps 2)
measure 7b_zero3 "$N" "${opts[@]}" -- "${args[@]}" data.micro_batch_size=1 && exit 0
oom 7b_zero3 || exit 1
measure 7b_zero3_recompute "$N" "${opts[@]}" -- "${args[@]}" data.micro_batch_size=2 train.activation_checkpointing=true
