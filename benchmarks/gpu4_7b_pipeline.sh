#!/usr/bin/env bash
# Runbook (d), FOUR H100s: the 7B RRWKV as a DeepSpeed pipeline of 4 stages (one per GPU, ZeRO-1,
# data parallel 1), ctx 4096, bf16, 16 micro-batches a step: tokens/s, MFU, memory of every stage,
# and the bubble: the schedule's (P-1)/(m+P-1) = 3/19 = 15.8% beside the measured time each stage
# spends outside forward and backward compute (launch/benchmark.py's "pipeline" entry).
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu4_7b_pipeline.sh
#   COMPILE=true ...   with model.compile=true
#
# Time (planned): about 1 min start-up (each stage builds and initializes its own layers), 9 steps
# of 2-3 s; 2-3 min. If the first layout runs out of memory, the second runs after it.
# Memory per GPU (benchmarks/memory_estimate.py, eager, bf16; partitioned by parameters as DeepSpeed
# balances them: stage 0 the embedding and 8 blocks, stages 1 and 2 8 blocks, stage 3 8 blocks and
# the head; about 78 GiB usable):
#   7b_pipe4 (micro-batch 1 x 4096, no recompute; stage 0 keeps 4 micro-batches in flight):
#     stage 0: weights 3.7 + bf16 and fp32 gradients 11.1 + master and Adam 22.2 + buckets 1.9
#     + activations 27.2 = 66 GiB; stages 1-3: 49-56 GiB.
#   7b_pipe4_recompute (fallback; micro-batch 2, 16 micro-batches, activation checkpointing):
#     stage 0 41.5 GiB, the last stage (head and loss) 45.7 GiB.
source "$(dirname "$0")/runbook.sh"
report_env
N=$(gpus 4)
T=$(seqlen 4096)
args=(--config configs/model/7b.yaml data.seq_len="$T" parallel.pipeline_stages="$N" parallel.zero_stage=1
      model.compile="${COMPILE:-false}")
opts=(--no-sdpa --warmup 2 --steps 5 --phase-steps 2)
measure 7b_pipe4 "$N" "${opts[@]}" -- "${args[@]}" data.micro_batch_size=1 train.global_batch_size=16 && exit 0
oom 7b_pipe4 || exit 1
measure 7b_pipe4_recompute "$N" "${opts[@]}" -- "${args[@]}" data.micro_batch_size=2 train.global_batch_size=32 \
  train.activation_checkpointing=true
