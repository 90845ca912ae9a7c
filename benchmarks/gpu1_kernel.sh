#!/usr/bin/env bash
# The WKV kernel (issue #3) on one GPU in one command: its GPU tests, the benchmark table, per-kernel
# profiles and the cold/warm compile times. Everything goes to $OUT/kernel/.
#
#   source benchmarks/on_device.sh && OUT=$OUT bash benchmarks/gpu1_kernel.sh        # about 5-7 minutes
#
# A/B against another version of the kernel's sources, in the same run on the same card (METHOD.md):
# here, before the device call, `mkdir -p .kbase && git archive main kernels/csrc | tar -x -C .kbase`
# (git ignores .kbase/: carry it), then on the device
#   source .whl/activate.sh && BASELINE_CSRC=.kbase/kernels/csrc OUT=$OUT bash benchmarks/gpu1_kernel.sh
# adds the baseline's rows and the ratio of the kernel times to the table.
#
# Variants (e.g. other WKV_WIN / WKV_NBUF defaults in copies of kernels/csrc, which
# `bash benchmarks/kernel_variant.sh .kvar/NAME MACRO=VALUE ...` makes here): VARIANTS="DIR ..." builds
# them in parallel while the tests run, then `kernels.benchmark --compare` times this build's kernels
# against each of them on the same inputs (step compare).
#
# SKIP="ncu ncu_scans ..." leaves out the steps named (a quicker A/B).
#
# Steps run in order of importance and each is capped, so that a slow one cannot take the rest of a
# 10-minute command with it; a step that fails is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rrwkv-out}
R=$OUT/kernel
mkdir -p "$R"
export RRWKV_KERNEL_CACHE=${RRWKV_KERNEL_CACHE:-/tmp/rrwkv-kernels}
PY=${PYTHON:-python3}

step() {   # step NAME SECONDS COMMAND...: run, tee to $R/NAME.txt, record the exit status
  local name=$1 secs=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)"; return 0 ;; esac
  echo "== $name ($(date -u +%T), at most ${secs}s): $*"
  timeout "$secs" "$@" > >(tee "$R/$name.txt") 2>&1
  local rc=$?
  echo "$name $rc" >> "$R/status.txt"
  echo "== $name: exit $rc"
}

: > "$R/status.txt"
# (the device tool brings back at most 8 files: the card goes into status.txt, not a file of its own)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$R/status.txt" 2>&1
cat "$R/status.txt"
for d in ${VARIANTS:-}; do   # compile the variants meanwhile (each its own cached build)
  RRWKV_WKV_CSRC=$d "$PY" -c "import torch; from rrwkv.kernels.build import load_wkv_extension as l; l(torch.bfloat16)" \
    > "/tmp/prebuild_$(echo "$d" | tr / _).log" 2>&1 &
done
step tests 240 "$PY" -m pytest -q -m cuda -rs tests/test_wkv_cuda.py
wait
[ -n "${VARIANTS:-}" ] && step compare 150 "$PY" -m rrwkv.kernels.benchmark --compare $VARIANTS
step bench 200 "$PY" -m rrwkv.kernels.benchmark --rep 30 ${BASELINE_CSRC:+--baseline-csrc "$BASELINE_CSRC"}
step profile 60 "$PY" -m rrwkv.kernels.benchmark --profile
# Hardware counters of the four chunk kernels at (4,4096,2048), second step (the first compiles):
# speed of light, occupancy, warp stalls, memory traffic. ncu reads counters on the Firecracker
# machines (the device tool's KINDS.md); the clocks are left alone (its METHOD.md).
step ncu 150 ncu --clock-control none -k "regex:k_(fwd_local|fwd_out|bwd_local|bwd_out)" --launch-skip 4 \
  --launch-count 4 --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section LaunchStats \
  "$PY" -m rrwkv.kernels.benchmark --steps-only 2 --shapes 4x4096x2048
# The scans at one long sequence (B=1, T=16384: 64 blocks of 2 warps walk 256 chunks and 256 segments;
# 0.127 of v9's 0.614 ms there): what bounds them (latency, outstanding loads, issue).
step ncu_scans 90 ncu --clock-control none -k "regex:k_(fwd|bwd)_scan" --launch-skip 2 --launch-count 2 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  "$PY" -m rrwkv.kernels.benchmark --steps-only 2 --shapes 1x16384x2048
step compile_times 120 "$PY" -m rrwkv.kernels.benchmark --compile-times --cache-dir "/tmp/rrwkv-kernels-cold-$$"
cat "$R/status.txt"
