#!/usr/bin/env bash
# Runbook: why the 1.5B RRWKV trains at half the SDPA transformer's tokens/s inside the engine (one H100).
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_diagnose.sh          # about 7 minutes
#
# Measured 2026-11-27 (docs/performance.md "1.5B on one H100"): at ctx 4096, micro-batch 2, 4 per step,
# ZeRO-2, eager, RRWKV 21,972 tokens/s (MFU 19.2%) against SDPA 42,800 (41.9%). The bare models
# (benchmarks/profile_model.py, no engine, no optimizer) are much closer: 198 against 160 ms per
# micro-batch's forward + backward. Inside the engine RRWKV's backward takes 124 ms more per micro-batch
# than bare (SDPA's: 17 ms more), and its optimizer step 173 ms against SDPA's 76 for the same number
# of parameters. This runbook tells the candidate causes apart, one run each:
#   a  the same run again with --profile: kernels and host-side calls of one step of each model
#      (allocator calls such as cudaFree / cudaMalloc, synchronizations, per-parameter hooks);
#      the JSON now has the allocator's reserved peak and its retries (cache flushes) per model
#   b  a with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (no fragmentation): if the allocator
#      is the cause, RRWKV's backward and optimizer times drop here
#   c  RRWKV alone at micro-batch 1 x 8 (half the activations) and without L2Wrap (RRWKV-only work
#      on the 50304-wide logits): memory pressure and the regularizer, apart
#   d  benchmarks/profile_model.py with the whole 24 layers: the bare models, to compare with a
source "$(dirname "$0")/runbook.sh"
report_env
T=$(seqlen 4096)
args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" parallel.zero_stage=2)
bench 1b5_diag_a 1 --profile --warmup 2 --steps 4 --phase-steps 2 "${args[@]}" data.micro_batch_size=2 \
  train.global_batch_size=8
grep -A40 "^profile of one" "$OUT/1b5_diag_a.log" | grep -v "^\[" | cut -c1-160 | head -80
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  bench 1b5_diag_b_expandable 1 --warmup 2 --steps 4 --phase-steps 2 "${args[@]}" data.micro_batch_size=2 \
  train.global_batch_size=8
bench 1b5_diag_c_mb1_nol2 1 --no-sdpa --warmup 2 --steps 4 --phase-steps 2 "${args[@]}" data.micro_batch_size=1 \
  train.global_batch_size=8 train.l2wrap=false
if [ "$TINY" != 1 ]; then
  timeout 150 python3 benchmarks/profile_model.py --layers 24 --steps 2 --top 8 2>&1 | grep -v -i warn \
    | tee "$OUT/1b5_diag_d_bare.txt"
fi
summarize "$OUT"/1b5_diag_*.json
