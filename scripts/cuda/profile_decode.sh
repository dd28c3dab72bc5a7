#!/usr/bin/env bash
# Where a decode step's device time goes (#20): Nsight Compute (ncu) times every kernel of a
# short `bench-serve` run on a shallow model of the full width, and scripts/cuda/decode_profile.py
# splits the kernels into decode steps (a step ends at its Gumbel sampling launch) and sums the
# last complete steps by kernel. One device call:
#
#   device run:  bash scripts/cuda/profile_decode.sh
#                carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
#
# LAYERS (4), CONC (64), PROMPT (512), GEN (6) set the run; $OUT/decode_profile.{csv,txt}.
# ncu serialises the kernels, so wall times under it mean nothing: only the per-kernel device
# durations (gpu__time_duration.sum, clocks left to the driver) are used.
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
echo "ncu: $NCU"
CONC="${CONC:-64}"
timeout "${PROFILE_TIMEOUT_S:-300}" "$NCU" --csv --print-units base --clock-control none --metrics gpu__time_duration.sum \
  --log-file "$OUT/ncu.log" \
  "$B/lockstep" bench-serve --random testdata/configs/qwen3_30b_a3b.json --num-layers "${LAYERS:-4}" --device cuda --dtype bf16 \
  --prompt-len "${PROMPT:-512}" --output-len "${GEN:-6}" --concurrency "$CONC" --capture on > "$OUT/bench.out" 2> "$OUT/bench.err"
echo "ncu rc $?"
# with --log-file ncu writes its CSV there, after its own ==PROF== / ==WARNING== lines
grep -v '^==' "$OUT/ncu.log" > "$OUT/decode_profile.csv"
echo "$(wc -l < "$OUT/decode_profile.csv") csv lines"
tail -3 "$OUT/bench.err"
python3 scripts/cuda/decode_profile.py "$OUT/decode_profile.csv" --layers "${LAYERS:-4}" | tee "$OUT/decode_profile.txt"
