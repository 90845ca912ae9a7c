# Shared set-up of the GPU runbooks benchmarks/gpu*.sh: sourced by them, not run on its own.
#
# On the GPU machine (from the project root, with .whl/ sent along; see ../shared/device/README.md):
#     source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu1_1b5_vs_sdpa.sh
# Each runbook writes into $OUT: env.txt (GPUs, versions, CPU, memory), ds_report.txt, one
# NAME.log (the full output) and NAME.json (launch/benchmark.py's results) per run, and
# NAME.estimate.json (benchmarks/memory_estimate.py's plan for that run) beside it.
#
# RRWKV_RUNBOOK_TINY=1 runs the same commands with a tiny model on CPU (gloo ranks instead of GPUs,
# 2 ranks where the GPU run has 4): a check of the runbook's code paths, not a measurement.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-runs/runbook}
mkdir -p "$OUT"
export RRWKV_CACHE_DIR=${RRWKV_CACHE_DIR:-/tmp/rrwkv-cache} RRWKV_KERNEL_CACHE=${RRWKV_KERNEL_CACHE:-/tmp/rrwkv-kernels}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/rrwkv-inductor}   # compiled graphs, reused across runs
TINY=${RRWKV_RUNBOOK_TINY:-0}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-540}   # seconds per run: a hung collective must not eat the whole lease
# Every run: bf16, torch's fused CUDA AdamW (optim.fused_adam=false: DeepSpeed's FusedAdam would be
# JIT-built first, about a minute of the lease), no wandb, no checkpoints (benchmark.py never saves).
COMMON=(--config configs/tiny.yaml train.precision=bf16 optim.fused_adam=false logging.wandb.mode=disabled)
SHRINK=()
if [ "$TINY" = 1 ]; then
  # Tiny widths and 1/64 of the sequence length; layouts, ZeRO stages and micro-batch counts stay.
  SHRINK=(model.n_layer=4 model.n_embd=64 model.vocab_size=512 model.medium_interval=16 model.se_reduction=16)
fi

seqlen() {  # the sequence length a run uses: the GPU one, or 1/64 of it on the tiny check
  if [ "$TINY" = 1 ]; then echo $(($1 / 64)); else echo "$1"; fi
}

gpus() {  # the number of ranks: the GPU one, or at most 2 on the tiny check
  if [ "$TINY" = 1 ] && [ "$1" -gt 2 ]; then echo 2; else echo "$1"; fi
}

report_env() {
  {
    date -u
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
    nvidia-smi topo -m 2>/dev/null | head -12
    python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null
    echo "cpus $(nproc)"; free -g | head -2
    git rev-parse HEAD; git status --short | head -5
  } > "$OUT/env.txt" 2>&1
  ds_report > "$OUT/ds_report.txt" 2>&1
  cat "$OUT/env.txt"
  if [ "$TINY" != 1 ]; then   # the WKV kernel once per machine (about 25 s cold), timed apart from the runs
    python3 -c "
import time, torch; from rrwkv.kernels import build
t = time.time(); build.load_wkv_extension(torch.bfloat16); print(f'WKV kernel (bf16) build/load {time.time() - t:.1f} s')" \
      2>&1 | tail -1 | tee -a "$OUT/env.txt"
  fi
}

# estimate NAME NGPU overrides...: benchmarks/memory_estimate.py's plan for the run, to NAME.estimate.json
estimate() {
  local name=$1 n=$2; shift 2
  python3 benchmarks/memory_estimate.py --gpus "$n" --json "$OUT/$name.estimate.json" "${COMMON[@]}" "$@" \
    "${SHRINK[@]}" 2>&1 | grep -v "WARNING\|^\[" | tee "$OUT/$name.estimate.txt"
}

# bench NAME NGPU [benchmark.py options and overrides...]: one launch/benchmark.py run on NGPU ranks.
bench() {
  local name=$1 n=$2; shift 2
  local t0=$SECONDS port=$((29500 + RANDOM % 2000))
  timeout --signal=TERM --kill-after=30 "$BENCH_TIMEOUT" \
    deepspeed --num_gpus "$n" --master_port "$port" launch/benchmark.py --json "$OUT/$name.json" \
    "${COMMON[@]}" "$@" "${SHRINK[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s ($n ranks)"
  [ $rc -ne 0 ] && grep "^benchmark:" "$OUT/$name.log" | tail -3   # how far a stopped run got
  grep -E "^\{\"device|^model |^rrwkv|^sdpa|^pipeline:|^RRWKV /|^error|out of memory|Error" "$OUT/$name.log" \
    | grep -v "^\[" | cut -c1-400 | tail -14
  return $rc
}

# measure NAME NGPU [benchmark.py options...] -- overrides...: the memory plan of a run (estimate, into
# NAME.estimate.json) and the run itself (bench), both given the same config overrides.
measure() {
  local name=$1 n=$2; shift 2
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ "${1:-}" = -- ] || { echo "measure $name: the config overrides follow a '--'" >&2; return 2; }
  shift
  estimate "$name" "$n" "$@" > /dev/null
  bench "$name" "$n" "${opts[@]}" "$@"
}

# summarize FILE.json...: one line per model of each launch/benchmark.py result: tokens/s, MFU, the
# synchronized phases, peak allocated and reserved memory, allocator retries. Files without "results"
# (NAME.estimate.json, which the runbooks' NAME_*.json globs also match) are skipped.
summarize() {
  python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    results = json.load(open(path)).get("results")
    if not isinstance(results, dict):
        continue
    for name, r in results.items():
        if isinstance(r, dict) and "seconds" in r:
            s = r["seconds"]
            print(f"{path.rsplit('/', 1)[-1]:26} {name:26} {r['tokens_per_s']:8.0f} tok/s  MFU {r.get('mfu', 0):.3f}  "
                  f"fwd {s['forward']:.3f} bwd {s['backward']:.3f} opt {s['optimizer']:.3f}  mem {r['mem_gb']:.1f} GB, "
                  f"reserved {max(r.get('mem_reserved_gb_per_rank', [0])):.1f} GB, "
                  f"alloc retries {max(r.get('alloc_retries_per_rank', [0]))}")
PY
}

# oom NAME: did run NAME stop for lack of GPU memory?
oom() {
  grep -qiE "out of memory|OutOfMemoryError" "$OUT/$1.log" 2>/dev/null || \
    grep -q '"error": "out of memory' "$OUT/$1.json" 2>/dev/null
}
