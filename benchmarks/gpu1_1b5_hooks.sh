#!/usr/bin/env bash
# Runbook, ONE H100, round 3 of the 1.5B diagnosis (rounds 1-2: gpu1_1b5_diagnose.sh, gpu1_1b5_engine.sh;
# docs/performance.md): how the gradients get from autograd into DeepSpeed's optimizer, per parameter
# tensor (RRWKV has 558, the SDPA transformer 196). All ZeRO-1 (the fastest on one GPU, 2026-11-27),
# ctx 4096, micro-batch 2, 4 a step, eager.
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_hooks.sh          # about 5 minutes
#
#   f  ZeRO-1, bf16 with fp32 gradient accumulation: DeepSpeed's BF16 optimizer adds each parameter's
#      gradient into its fp32 copy in a loop after each micro-batch's backward (the default; round 2's
#      best, 36,167-36,430 tokens/s), both models
#   h  f with bf16.immediate_grad_update: the same additions in per-parameter hooks during the
#      backward (host work that can overlap the GPU's backward)
#   i  ZeRO-1 with bf16 gradient accumulation and neither overlap_comm nor contiguous_gradients: no
#      per-parameter work at all during the steps (autograd accumulates in the bf16 .grad; one
#      reduction at the last micro-batch), at the price of bf16 rounding over the 4 micro-batches
source "$(dirname "$0")/runbook.sh"
report_env
T=$(seqlen 4096)
args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" data.micro_batch_size=2
      train.global_batch_size=8 parallel.zero_stage=1)
opts=(--warmup 2 --steps 4 --phase-steps 2)
bench 1b5_hooks_f 1 "${opts[@]}" "${args[@]}"
bench 1b5_hooks_h 1 --no-sdpa "${opts[@]}" "${args[@]}" parallel.deepspeed.bf16.immediate_grad_update=true
bench 1b5_hooks_i 1 --no-sdpa "${opts[@]}" "${args[@]}" train.grad_accum_dtype=bf16 \
  parallel.deepspeed.zero_optimization.overlap_comm=false parallel.deepspeed.zero_optimization.contiguous_gradients=false
summarize "$OUT"/1b5_hooks_*.json
