#!/usr/bin/env bash
# Where a training micro-batch's device time goes, kernel by kernel (#21): Nsight Compute (ncu)
# times every kernel of `bench-stages --only STAGE` (one warm-up and one timed run of that stage
# alone, 21 x 768 tokens at the Qwen3-30B-A3B width, bf16, invariant kernels) and
# scripts/cuda/kernel_profile.py sums them by kernel name. One device call:
#
#   device run:  bash scripts/cuda/profile_stages.sh
#                carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
#
# STAGES (comma-separated `bench-stages --only` words, each profiled on its own; default
# "layer forward + backward,attention kernel forward + backward") -> $OUT/profile_<i>.{csv,txt}.
# ncu serialises the kernels: only the per-kernel device durations (gpu__time_duration.sum)
# mean anything, not the stage's wall time under it.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-profile}"; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
B=/tmp/lockstep-profile-bin; mkdir -p "$B"
gunzip -c .gpu-bin/lockstep.gz > "$B/lockstep" && chmod +x "$B/lockstep"
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)"
[[ -x "$NCU" ]] || { echo "no ncu found"; exit 1; }
IFS=',' read -r -a LIST <<< "${STAGES:-layer forward + backward,attention kernel forward + backward}"
i=0
for stage in "${LIST[@]}"; do
  i=$((i + 1))
  echo "== ncu: bench-stages --only \"$stage\""
  timeout "${PROFILE_TIMEOUT_S:-200}" "$NCU" --csv --print-units base --clock-control none --metrics gpu__time_duration.sum \
    "$B/lockstep" bench-stages --random testdata/configs/qwen3_30b_a3b.json --kernels "${KERNELS:-invariant}" \
    --warmup 1 --iters 1 --only "$stage" > "$OUT/profile_$i.csv" 2> "$OUT/profile_$i.err"
  echo "ncu rc $?; $(wc -l < "$OUT/profile_$i.csv") csv lines"
  python3 scripts/cuda/kernel_profile.py "$OUT/profile_$i.csv" --runs 2 --title "$stage" | tee "$OUT/profile_$i.txt"
done
