#!/usr/bin/env bash
# Runbook (a), ONE H100: the 1.5B RRWKV (configs/model/1b5.yaml, 1.54B parameters) against the
# equal-parameter SDPA transformer (pretrain/baseline.py, FlashAttention) at ctx 4096 and 16384,
# each model eager and then with its blocks compiled (--also-compiled), all in one benchmark
# process per length. Issue #8 asks for MFU >= 45% at 4096 and RRWKV tokens/s >= SDPA's at 4096,
# >= 1.4x at 16384.
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_vs_sdpa.sh     # both lengths
#   source .whl/activate.sh && CTX=4096 OUT=$OUT bash benchmarks/gpu1_1b5_vs_sdpa.sh   # one length
#
# Time (planned, not measured): per length about 1 min start-up (model init, engine), 4 x 9 steps
# of about 1 s, and the first compiled step of each model (inductor, 1-2 min cold); about 4 min a
# length, so CTX=4096 and CTX=16384 as two commands if the lease is short.
#
# Memory per GPU (benchmarks/memory_estimate.py, eager RRWKV, bf16, ZeRO-2 on one rank; the card
# has about 78 GiB; plus 1-3 GiB of CUDA context and workspaces, and fragmentation):
#   ctx 4096, micro-batch 2 x 4096, 4 micro-batches a step (32k tokens), no recompute:
#     weights 2.9 + fp32 gradients 5.7 + master weights and Adam 17.2 + buckets 1.9
#     + activations 24.5 (measured peak of one micro-batch's forward and backward) = 52 GiB.
#     Micro-batch 4 would need 77 GiB: too close to the card.
#   ctx 16384, micro-batch 1 x 16384, 2 micro-batches a step (32k tokens): without recompute
#     77 GiB, so activation checkpointing for both models: 2.9 + 5.7 + 17.2 + 1.9 + 12.4 = 40 GiB.
source "$(dirname "$0")/runbook.sh"
report_env
rc=1
for ctx in ${CTX:-4096 16384}; do
  T=$(seqlen "$ctx")
  if [ "$ctx" -le 4096 ]; then
    layout=(data.micro_batch_size=2 train.global_batch_size=8)
  else
    layout=(data.micro_batch_size=1 train.global_batch_size=2 train.activation_checkpointing=true)
  fi
  args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" parallel.zero_stage=2 "${layout[@]}")
  measure "1b5_ctx$ctx" 1 --also-compiled --warmup 2 --steps 5 --phase-steps 2 -- "${args[@]}" && rc=0
done
exit $rc
