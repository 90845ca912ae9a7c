#!/usr/bin/env bash
# Distributed-engine figures on one host with 2 GPUs (docs/performance.md, "Engine"):
# the 169m config with the CUDA kernel, bf16, ZeRO-2 data parallel and 2 pipeline stages (ZeRO-1),
# and an fp16 run with an injected inf (the step must be skipped and counted).
# Usage (from the repo root, on the GPU machine): OUT=/some/dir bash benchmarks/engine_2gpu.sh
set -uo pipefail
OUT=${OUT:-runs/engine_2gpu}
mkdir -p "$OUT"
export RRWKV_CACHE_DIR=${RRWKV_CACHE_DIR:-/tmp/rrwkv-cache} RRWKV_KERNEL_CACHE=${RRWKV_KERNEL_CACHE:-/tmp/rrwkv-kernels}
RUNS=${RUNS:-/tmp/rrwkv-runs}
STEPS=${STEPS:-30}
common=(--config configs/tiny.yaml --config configs/model/169m.yaml data.seq_len=2048 data.micro_batch_size=8
        train.global_batch_size=16 train.precision=bf16 train.max_steps=$STEPS train.log_every=5 train.eval_every=0
        train.save_every=0 logging.wandb.mode=disabled optim.fused_adam=false optim.warmup_steps=5)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c "from rrwkv.data_tools.builtin import prepare_builtin_corpus; print(prepare_builtin_corpus(vocab_size=2048))"
python3 -c "
import time, torch; from rrwkv.kernels import build
t=time.time(); build.load_wkv_extension(torch.bfloat16); print(f'kernel bf16 compile/load {time.time()-t:.1f} s')"
deepspeed --num_gpus 2 launch/pretrain.py "${common[@]}" run.out_dir=$RUNS/zero2 parallel.zero_stage=2 \
  > "$OUT/zero2.log" 2>&1; echo "zero2 exit $?"
deepspeed --num_gpus 2 launch/pretrain.py "${common[@]}" run.out_dir=$RUNS/pipe2 parallel.pipeline_stages=2 \
  parallel.zero_stage=1 > "$OUT/pipe2.log" 2>&1; echo "pipe2 exit $?"
RRWKV_FAULT_NONFINITE_STEPS=3 python3 launch/pretrain.py --config configs/tiny.yaml run.out_dir=$RUNS/fp16 \
  train.precision=fp16 train.max_steps=5 train.log_every=1 logging.wandb.mode=disabled optim.fused_adam=false \
  > "$OUT/fp16.log" 2>&1; echo "fp16 exit $?"
cp $RUNS/zero2/metrics.jsonl "$OUT/zero2_metrics.jsonl" 2>/dev/null
cp $RUNS/pipe2/metrics.jsonl "$OUT/pipe2_metrics.jsonl" 2>/dev/null
for f in zero2 pipe2 fp16; do echo "== $f"; grep -E "^(model|step|done|error)|Error|error:" "$OUT/$f.log" | cut -c1-260 | tail -12; done
