#!/usr/bin/env bash
# Runbook, ONE H100, round 4 of the 1.5B work (issue #8; rounds 1-3 in docs/performance.md): what is
# left between the one-graph compiled block (47,661 tokens/s, MFU 41.6%, 0.999x compiled SDPA at
# ctx 4096, 2026-11-27) and MFU 45%. Both models compiled (model.compile=true), ZeRO-1, ctx 4096.
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_round4.sh        # about 4 minutes
#
#   j  micro-batch 2, 4 a step, with bf16.immediate_grad_update (the fp32 gradient additions in
#      per-parameter hooks during the backward: +2.3% eager in round 3), both models
#   k  j with micro-batch 3, 3 a step (36k tokens): the host's fixed cost per micro-batch spread over
#      1.5x the tokens. Memory (benchmarks/memory_estimate.py, eager): 67.3 GiB (activations 36.7);
#      at micro-batch 2 it says 55.0 where round 3 measured 52.5 compiled and 50.4 with the hooks.
source "$(dirname "$0")/runbook.sh"
report_env
T=$(seqlen 4096)
args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" parallel.zero_stage=1
      model.compile=true parallel.deepspeed.bf16.immediate_grad_update=true)
opts=(--warmup 2 --steps 4 --phase-steps 2)
measure 1b5_r4_j 1 "${opts[@]}" -- "${args[@]}" data.micro_batch_size=2 train.global_batch_size=8
measure 1b5_r4_k 1 "${opts[@]}" -- "${args[@]}" data.micro_batch_size=3 train.global_batch_size=9
summarize "$OUT"/1b5_r4_*.json
