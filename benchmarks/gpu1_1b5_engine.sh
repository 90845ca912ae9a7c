#!/usr/bin/env bash
# Runbook, ONE H100, round 2 of the 1.5B diagnosis (round 1: benchmarks/gpu1_1b5_diagnose.sh).
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_engine.sh          # about 7 minutes
#
# Round 1 (2026-11-27, docs/performance.md) found the eager RRWKV step host-bound inside the engine:
# the GPU was busy 45% of a profiled step (SDPA's: 95%), with 6,360 kernel launches per micro-batch
# (SDPA's: 1,540) and ZeRO-2's per-parameter gradient hooks (AccumulateGrad) taking 98 ms of host time
# per micro-batch over RRWKV's 558 parameter tensors (SDPA's 196: 32 ms). The allocator was not the
# cause (expandable segments: 2% faster; no allocator retries). This round, at ctx 4096, micro-batch 2,
# 4 per step:
#   e  both models eager and with their blocks compiled (--also-compiled): fewer launches, fused
#      elementwise work
#   f  RRWKV under ZeRO-1 instead of ZeRO-2: the gradient hooks then only accumulate (and reduce at
#      the last micro-batch), instead of copying every gradient into the partitioned buffers
#   g  RRWKV under ZeRO-2 with bf16 gradient accumulation (train.grad_accum_dtype=bf16)
source "$(dirname "$0")/runbook.sh"
report_env
T=$(seqlen 4096)
args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" data.micro_batch_size=2
      train.global_batch_size=8)
bench 1b5_eng_e_compiled 1 --also-compiled --warmup 2 --steps 4 --phase-steps 2 "${args[@]}" parallel.zero_stage=2
bench 1b5_eng_f_zero1 1 --no-sdpa --warmup 2 --steps 4 --phase-steps 2 "${args[@]}" parallel.zero_stage=1
bench 1b5_eng_g_bf16acc 1 --no-sdpa --warmup 2 --steps 4 --phase-steps 2 "${args[@]}" parallel.zero_stage=2 \
  train.grad_accum_dtype=bf16
summarize "$OUT"/1b5_eng_*.json
