#!/usr/bin/env bash
# Issue #9 (EIGHT H100s, nvidia-h100-x8): data-parallel scaling of the 1.5B RRWKV with ZeRO-2 at 1, 2,
# 4 and 8 GPUs in one command, the same per-GPU work each time (weak scaling: micro-batch 2 x 4096,
# 4 micro-batches a step on each GPU), as runbook (b) does for 1 and 4. Scaling at N GPUs =
# tokens/s on N / (N x tokens/s on 1). Writes 1b5_zero2_{1,2,4,8}gpu.json and scaling8.json.
#
#   source .whl/activate.sh && OUT=$OUT bash benchmarks/gpu8_1b5_scaling.sh
#   COMPILE=true ...   all four with model.compile=true
#
# Time (planned, not measured): about 1.5 min a run, 6-7 min in all (BENCH_TIMEOUT caps each run).
# Memory per GPU: as runbook (b), 52 GiB on 1 GPU falling to about 33 GiB on 8 (the optimizer states
# are partitioned; activations, 24.5 GiB, are not).
source "$(dirname "$0")/runbook.sh"
report_env
T=$(seqlen 4096)
args=(--config configs/model/1b5.yaml data.seq_len="$T" data.micro_batch_size=2 parallel.zero_stage=2
      model.compile="${COMPILE:-false}")
counts=()
for n in 1 2 4 8; do
  n=$(gpus "$n")
  case " ${counts[*]} " in *" $n "*) continue;; esac   # the tiny CPU check caps ranks at 2
  counts+=("$n")
  measure "1b5_zero2_${n}gpu" "$n" --no-sdpa --warmup 2 --steps 5 --phase-steps 2 -- "${args[@]}" \
    train.global_batch_size=$((8 * n)) || exit 1
done
python3 - "$OUT" "${counts[@]}" <<'PY'
import json, sys
out, counts = sys.argv[1], [int(x) for x in sys.argv[2:]]
res = {n: json.load(open(f"{out}/1b5_zero2_{n}gpu.json"))["results"]["rrwkv"] for n in counts}
one = res[counts[0]]["tokens_per_s"]
s = {"gpus": counts,
     "tokens_per_s": {n: r["tokens_per_s"] for n, r in res.items()},
     "scaling_efficiency": {n: r["tokens_per_s"] / (n * one) for n, r in res.items()},
     "mfu": {n: r["mfu"] for n, r in res.items()},
     "mem_gb": {n: r.get("mem_gb") for n, r in res.items()}}
json.dump(s, open(f"{out}/scaling8.json", "w"), indent=1)
print(json.dumps(s))
PY
