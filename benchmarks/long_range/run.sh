#!/usr/bin/env bash
# One run of the long-range study (docs/long_range.md): tokenize the carried corpus (once per machine),
# train configs/study/base.yaml + configs/study/NAME.yaml, export, evaluate, and write the run's
# result file (training summary + evaluation report) and its log.
#
#   source .whl/activate.sh && bash benchmarks/long_range/run.sh NAME [SEED] [key=value ...]
#
# NAME   rwkv4 | rrwkv-s32 | rrwkv-s128
# SEED   run.seed (default 1234, base.yaml's); another seed writes NAME-seedSEED
# key=value  extra training overrides: the run is then marked a pilot, not a study run
#
# Environment (defaults):
#   STEPS                 train.max_steps, the same for every run (default base.yaml's: 2400 x 16 x 1024 tokens)
#   BUDGET_S=510          wall seconds for this script; training stops cleanly (SIGUSR1: checkpoint,
#                         exit 75) EVAL_RESERVE_S before the end, and the same command run again
#                         continues it from the checkpoint (runs/ survives on a warm machine)
#   EVAL_RESERVE_S=110    seconds kept for export, evaluation and the summary
#   DEVICE=auto           auto | cpu (cpu: fp32, a pilot)
#   SHARED_GPU=1          how many runs share the GPU (several run.sh at once): recorded in the result file;
#                         the report then leaves the run out of the tokens/s and wall-time comparison
#   CORPUS=.study  STUDY_DATA=/tmp/rrwkv-study-data  RUNS_DIR=runs/study
#   RESULTS_DIR           default $OUT/long_range when $OUT is set, else $RUNS_DIR/results
#   TASK_SAMPLES=20 EVAL_BATCH=16 EVAL_MAX_TOKENS= (all) EVAL_MAX_DOCS= (all) BUCKETS=0,256,1024,4096,16384
#   PASSKEY_DISTANCES=64,256,1024,4096 RECALL_DISTANCES=64,256,1024,4096 PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s.%N)
export PYTHONUNBUFFERED=1     # the log (and the device reply's tail) stays current
now() { python3 -c "import time; print(f'{time.time() - $T0:.1f}')"; }
die() { echo "error: $*" >&2; exit 2; }

NAME=${1:-}
[ -n "$NAME" ] || die "usage: bash benchmarks/long_range/run.sh NAME [SEED] [key=value ...] (NAME: rwkv4, rrwkv-s32, rrwkv-s128)"
[ "$NAME" != base ] && [ -f "configs/study/$NAME.yaml" ] || \
  die "no study config configs/study/$NAME.yaml; NAME is one of: $(cd configs/study && ls *.yaml | sed 's/\.yaml$//' | grep -vx base | tr '\n' ' ')"
shift
SEED=1234
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
  [[ "$1" =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer, got '$1'"
  SEED=$1; shift
fi
for ov in "$@"; do [[ "$ov" == *=* ]] || die "extra arguments are key=value overrides, got '$ov'"; done

PY=${PYTHON:-python3}
STEPS=${STEPS:-}; BUDGET_S=${BUDGET_S:-510}; EVAL_RESERVE_S=${EVAL_RESERVE_S:-110}; SHARED_GPU=${SHARED_GPU:-1}
DEVICE=${DEVICE:-auto}; CORPUS=${CORPUS:-.study}; STUDY_DATA=${STUDY_DATA:-/tmp/rrwkv-study-data}
RUNS_DIR=${RUNS_DIR:-runs/study}
if [ -n "${OUT:-}" ]; then RESULTS_DIR=${RESULTS_DIR:-$OUT/long_range}; else RESULTS_DIR=${RESULTS_DIR:-$RUNS_DIR/results}; fi
for v in BUDGET_S EVAL_RESERVE_S SHARED_GPU ${STEPS:+STEPS}; do [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"; done
case "$DEVICE" in auto|cpu) ;; *) die "DEVICE is auto or cpu, got '$DEVICE'";; esac

TAG=$NAME; [ "$SEED" = 1234 ] || TAG=$NAME-seed$SEED
RUN=$RUNS_DIR/$TAG
mkdir -p "$RESULTS_DIR" "$RUN"
LOG=$RESULTS_DIR/$TAG.log
exec > >(tee -a "$LOG") 2> >(tee -a "$LOG" >&2)
echo "== $TAG: $(date -u +%FT%TZ), STEPS=${STEPS:-base.yaml} BUDGET_S=$BUDGET_S DEVICE=$DEVICE overrides: ${*:-none}"
"$PY" -c "import deepspeed, webdataset, omegaconf, sentencepiece" 2>/dev/null || \
  die "deepspeed/webdataset/omegaconf/sentencepiece not importable: on the GPU machine run 'source .whl/activate.sh' first"

PILOT=(); EXTRA=(${STEPS:+train.max_steps=$STEPS}); EVAL_DEV=()
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  PILOT=(--pilot); EXTRA+=(train.precision=fp32); EVAL_DEV=(--device cpu)
fi
[ $# -eq 0 ] || PILOT=(--pilot)

# 1. data: the carried corpus tokenized once (reused on a warm machine)
DATA=$("$PY" benchmarks/long_range/prepare.py --corpus "$CORPUS" --out "$STUDY_DATA" --workers "$(nproc)")
T_DATA=$(now)

# 2. training, stopped cleanly by the time guard if it would leave too little for the evaluation;
#    a run directory left by a run with other settings is not resumed
if [ -f "$RUN/config.yaml" ]; then
  "$PY" -c '
import sys
from omegaconf import OmegaConf
from rrwkv.pretrain.config import load_config
try:
    old, new = OmegaConf.load(sys.argv[1]), load_config(sys.argv[2:4], sys.argv[4:])
except Exception as e:
    sys.exit(f"error: {e}")
keys = ["run.seed"] + [f"{s}.{k}" for s in ("model", "optim", "train") for k in new[s]]
diff = ", ".join(k for k in keys if OmegaConf.select(old, k) != OmegaConf.select(new, k))
if diff:
    sys.exit(f"error: {sys.argv[1]} is a run with other settings ({diff}); remove its folder or set RUNS_DIR")
' "$RUN/config.yaml" configs/study/base.yaml "configs/study/$NAME.yaml" run.seed="$SEED" \
    optim.fused_adam=false "${EXTRA[@]}" "$@" || exit 2
fi
TRAIN_S=$(python3 -c "print(int($BUDGET_S - $T_DATA - $EVAL_RESERVE_S))")
[ "$TRAIN_S" -ge 30 ] || die "BUDGET_S=$BUDGET_S leaves ${TRAIN_S}s for training after data preparation (${T_DATA}s) and EVAL_RESERVE_S=$EVAL_RESERVE_S"
echo "== training: time guard ${TRAIN_S}s"
TRAIN_RC=0
timeout --preserve-status --signal=USR1 --kill-after=90 "$TRAIN_S" \
  "$PY" launch/pretrain.py --config configs/study/base.yaml --config "configs/study/$NAME.yaml" \
    run.out_dir="$RUN" run.seed="$SEED" data.train="$DATA/train" data.valid="$DATA/valid" \
    optim.fused_adam=false logging.progress=false "${EXTRA[@]}" "$@" || TRAIN_RC=$?
T_TRAIN=$(now)
case $TRAIN_RC in
  0) ;;
  75) echo "== the time guard stopped training (checkpoint saved); the same command again continues it" ;;
  *) die "training exited with status $TRAIN_RC (see $LOG)" ;;
esac

# 3. export (fp32: the exact trained weights) and 4. evaluation, bounded by what is left of the budget
rm -rf "$RUN/model" "$RUN/eval.json"
"$PY" launch/export.py --checkpoint "$RUN" --output "$RUN/model"
T_EXPORT=$(now)
EVAL_S=$(python3 -c "print(max(30, int($BUDGET_S - $T_EXPORT - 10)))")
LIMITS=()
[ -z "${EVAL_MAX_TOKENS:-}" ] || LIMITS+=(--max-tokens "$EVAL_MAX_TOKENS")
[ -z "${EVAL_MAX_DOCS:-}" ] || LIMITS+=(--max-docs "$EVAL_MAX_DOCS")
echo "== evaluation (limit ${EVAL_S}s)"
EVAL_RC=0
timeout --kill-after=10 "$EVAL_S" "$PY" launch/evaluate.py --model "$RUN/model" --data "$DATA/valid" \
  --report "$RUN/eval.json" --buckets "${BUCKETS:-0,256,1024,4096,16384}" --batch-size "${EVAL_BATCH:-16}" \
  --task-samples "${TASK_SAMPLES:-20}" --passkey-distances "${PASSKEY_DISTANCES:-64,256,1024,4096}" \
  --recall-distances "${RECALL_DISTANCES:-64,256,1024,4096}" "${LIMITS[@]}" "${EVAL_DEV[@]}" || EVAL_RC=$?
T_EVAL=$(now)
[ $EVAL_RC -eq 0 ] || echo "== evaluation exited with status $EVAL_RC; the result file has no evaluation"

# 5. the result file
"$PY" benchmarks/long_range/summarize.py --name "$NAME" --seed "$SEED" --run-dir "$RUN" \
  --output "$RESULTS_DIR/$TAG.json" --eval "$RUN/eval.json" --train-exit "$TRAIN_RC" --eval-exit "$EVAL_RC" \
  --corpus "$CORPUS" --shared-gpu "$SHARED_GPU" --overrides "${EXTRA[*]} $*" "${PILOT[@]}" \
  --timing data="$T_DATA" train="$(python3 -c "print($T_TRAIN - $T_DATA)")" \
           export="$(python3 -c "print($T_EXPORT - $T_TRAIN)")" eval="$(python3 -c "print($T_EVAL - $T_EXPORT)")" \
           total="$(now)"
echo "== $TAG done in $(now)s: $RESULTS_DIR/$TAG.json"
[ $TRAIN_RC -eq 0 ] && [ $EVAL_RC -eq 0 ] || exit 75
