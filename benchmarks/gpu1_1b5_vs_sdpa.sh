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
# Time: at 4096 the same four timings under ZeRO-2 took 106 s (2026-11-27, runbook
# gpu1_1b5_engine.sh e); 16384 is not measured (recompute: slower steps). CTX=4096 and CTX=16384
# fit one command.
#
# ZeRO-1: on one GPU it is 14-18% faster than ZeRO-2 (docs/performance.md, 2026-11-27: ZeRO-2 keeps
# and steps partitioned fp32 gradient copies even on one rank; its optimizer step took 0.13-0.18 s
# against ZeRO-1's 0.04 s).
# Memory per GPU (benchmarks/memory_estimate.py, eager RRWKV, bf16, ZeRO-1 on one rank; the card
# has about 78 GiB; plus 1-3 GiB of CUDA context and workspaces, and fragmentation):
#   ctx 4096, micro-batch 2 x 4096, 4 micro-batches a step (32k tokens), no recompute:
#     weights 2.9 + gradients 8.6 + master weights and Adam 17.2 + buckets 1.9
#     + activations 24.5 (measured peak of one micro-batch's forward and backward) = 55 GiB
#     (measured: 53.3 GiB peak allocated). Micro-batch 4 would not fit.
#   ctx 16384, micro-batch 1 x 16384, 2 micro-batches a step (32k tokens): without recompute
#     about 80 GiB, so activation checkpointing for both models: 2.9 + 8.6 + 17.2 + 1.9 + 12.4 = 43 GiB.
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
  args=(--config configs/model/1b5.yaml model.ctx_len="$T" data.seq_len="$T" parallel.zero_stage=1 "${layout[@]}")
  measure "1b5_ctx$ctx" 1 --also-compiled --warmup 2 --steps 5 --phase-steps 2 -- "${args[@]}" && rc=0
done
exit $rc
