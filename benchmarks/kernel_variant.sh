#!/usr/bin/env bash
# A copy of the kernel's sources with other defaults, for gpu1_kernel.sh's VARIANTS (or BASELINE_CSRC):
#
#   bash benchmarks/kernel_variant.sh .kvar/sub4 WKV_SUB=4 WKV_MINB_BWD_OUT=7
#   ... VARIANTS="$PWD/.kvar/sub4/kernels/csrc" bash benchmarks/gpu1_kernel.sh      (carry .kvar)
#
# Each NAME=VALUE replaces the one `#define NAME ...` line of kernels/csrc (the macros meant for this
# are wrapped in #ifndef: WKV_SUB, WKV_WIN, WKV_NBUF, WKV_GROUP_MIN, WKV_MINB_*, U, UB, SB, SBT). A
# NAME defined on no line, or on several, stops it with nothing written. REV=git-revision takes the
# sources of that revision instead of the working tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 DIR [NAME=VALUE ...]" >&2; exit 2; }
dir=$1; shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${REV:-}" ]; then git archive "$REV" kernels/csrc | tar -x -C "$tmp"; else mkdir -p "$tmp/kernels" && cp -r kernels/csrc "$tmp/kernels/"; fi
for kv in "$@"; do
  name=${kv%%=*} value=${kv#*=}
  [[ "$kv" == *=* && "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "$0: '$kv' is not NAME=VALUE" >&2; exit 2; }
  lines=$(cat "$tmp"/kernels/csrc/* | grep -cE "^#define $name( |$)" || true)
  [ "$lines" = 1 ] || { echo "$0: #define $name is on $lines lines of kernels/csrc, not one" >&2; exit 1; }
  sed -i -E "s|^#define $name( .*)?$|#define $name $value|" "$tmp"/kernels/csrc/*
done
rm -rf "$dir"
mkdir -p "$dir"
mv "$tmp/kernels" "$dir/kernels"
echo "$dir/kernels/csrc: ${*:-(no changes)}"
