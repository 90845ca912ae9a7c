#!/usr/bin/env bash
# Runbook (e), FOUR H100s: the 14B RRWKV (configs/model/14b.yaml, 14.4B parameters) with ZeRO-3 and
# the optimizer offloaded to the CPU (DeepSpeedCPUAdam; OFFLOAD=all offloads the parameters too),
# ctx 4096, bf16. Issue #8 asks that steps complete with checkpoint saving off: launch/benchmark.py
# runs real optimizer steps on random tokens and never saves (a 14B checkpoint with its optimizer
# states is about 230 GB, the machine's whole disk).
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu4_14b_zero3_offload.sh
#   OFFLOAD=all ...    parameters offloaded as well (slower; less GPU memory)
#
# Time (planned): 2-3 min start-up (zero.Init and seeded init of 43 parts; pinning the CPU
# optimizer states; DeepSpeed JIT-builds its CPU Adam op the first time, about a minute), then
# 5 steps of roughly 5-15 s each (the CPU Adam step over 3.6B parameters a rank dominates); 4-6 min.
# Memory per GPU (benchmarks/memory_estimate.py, eager, bf16; about 78 GiB usable):
#   14b_zero3_offload (micro-batch 1 x 4096, 2 micro-batches a step, no recompute, offload=optimizer):
#     weights 6.7 (1/4) + bf16 gradients 6.7 + buckets and two gathered blocks 3.2 + activations
#     42.4 = 59 GiB; CPU: 54 GiB a rank (fp32 master, Adam m and v, fp32 gradients), 215 GiB in all,
#     pinned (the machine has 512 GiB).
#   14b_zero3_offload_recompute (fallback; micro-batch 2, activation checkpointing): 25 GiB.
#   Without offload ZeRO-3 would need 68 GiB with recompute at micro-batch 1 (optimizer 40 GiB a GPU).
source "$(dirname "$0")/runbook.sh"
report_env
N=$(gpus 4)
T=$(seqlen 4096)
off=${OFFLOAD:-optimizer}
args=(--config configs/model/14b.yaml data.seq_len="$T" parallel.zero_stage=3 parallel.offload="$off"
      model.compile="${COMPILE:-false}" train.global_batch_size=8)
opts=(--no-sdpa --warmup 1 --steps 3 --phase-steps 1)
measure 14b_zero3_offload "$N" "${opts[@]}" -- "${args[@]}" data.micro_batch_size=1 && exit 0
oom 14b_zero3_offload || exit 1
measure 14b_zero3_offload_recompute "$N" "${opts[@]}" -- "${args[@]}" data.micro_batch_size=2 \
  train.activation_checkpointing=true
