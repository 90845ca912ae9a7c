#!/usr/bin/env bash
# Issue #9 (EIGHT H100s, nvidia-h100-x8): the 14B RRWKV (configs/model/14b.yaml, 14.41B parameters),
# ctx 4096, bf16, on 8 GPUs: ZeRO-3 (no offload), then 2 pipeline stages x 4 data-parallel (ZeRO-1).
# Writes 14b_zero3_8gpu.json and 14b_pipe2x4.json (tokens/s, MFU, memory per rank, pipeline bubble).
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu8_14b.sh
#   LAYOUT=zero3 | LAYOUT=pipe   one of the two only (each fits a 10-minute command on its own)
#
# Memory per GPU (benchmarks/memory_estimate.py, eager; about 78 GiB usable), estimated, not measured:
#   ZeRO-3, micro-batch 1 x 4096, activation checkpointing: weights 3.4 + gradients 6.7 + optimizer
#     20.1 + buckets 3.2 + activations 4.3 = 37.8 GiB (without checkpointing about 76: too close).
#   2 stages x 4 DP, ZeRO-1, micro-batch 1, checkpointing, gradients accumulated in bf16
#     (train.grad_accum_dtype=bf16): weights 13.4 + gradients 20.1 + optimizer 20.1 + buckets 1.9 +
#     activations 1.8 / 4.6 = 57.4 / 60.1 GiB per stage. With fp32 accumulation (DeepSpeed's BF16
#     optimizer keeps fp32 gradients of the whole stage) it would be 77.5 / 80.2: too much for 80 GB.
source "$(dirname "$0")/runbook.sh"
report_env
N=$(gpus 8)
T=$(seqlen 4096)
layout=${LAYOUT:-both}
base=(--config configs/model/14b.yaml data.seq_len="$T" data.micro_batch_size=1 model.compile="${COMPILE:-false}"
      train.activation_checkpointing=true)
opts=(--no-sdpa --warmup 1 --steps 3 --phase-steps 1)
rc=0
if [ "$layout" != pipe ]; then
  z3=("${base[@]}" parallel.zero_stage=3 train.global_batch_size=$((2 * N)))
  measure 14b_zero3_8gpu "$N" "${opts[@]}" -- "${z3[@]}" || rc=1
fi
if [ "$layout" != zero3 ]; then
  pp=("${base[@]}" parallel.zero_stage=1 parallel.pipeline_stages=2 train.grad_accum_dtype=bf16
      train.global_batch_size=$((4 * N)))
  measure 14b_pipe2x4 "$N" "${opts[@]}" -- "${pp[@]}" || {
    if oom 14b_pipe2x4; then echo "== 14b_pipe2x4: out of memory"; fi
    rc=1
  }
fi
exit $rc
