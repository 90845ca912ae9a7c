#!/usr/bin/env bash
# Runbook, ONE H100, round 5 of the 1.5B work (issue #8): round 4's micro-batch-3 run (k: MFU 45.5%,
# 1.04x compiled SDPA, from 4 timed steps) again with twice the timed steps, as a check of a figure
# that is only just above the 45% target. Same settings: ctx 4096, ZeRO-1, both models compiled,
# bf16.immediate_grad_update, micro-batch 3, 3 a step.
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_round5.sh        # about 2.5 minutes
source "$(dirname "$0")/runbook.sh"
report_env
T=$(seqlen 4096)
args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" parallel.zero_stage=1
      model.compile=true parallel.deepspeed.bf16.immediate_grad_update=true)
measure 1b5_r5_k 1 --warmup 3 --steps 8 --phase-steps 2 -- "${args[@]}" data.micro_batch_size=3 train.global_batch_size=9
summarize "$OUT"/1b5_r5_*.json
