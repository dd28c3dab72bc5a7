#!/usr/bin/env bash
# Where the time goes, in one device call (issues #20 / #21): the kernels at decode sizes
# (`bench-invariant`, incl. the experts' grouped product), a training micro-batch's stages at
# the Qwen3-30B-A3B width (`bench-stages`, invariant and standard kernels), and the engine on
# the full 48-layer model (`bench-serve`: concurrency 1 and 64, capture on / off, the device
# sampler against the exact host one).
#
#   device run:  bash scripts/cuda/gpu_profile.sh     carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
#
# Writes $OUT/*.json and prints the tables. GEN (default 128) tokens generated per request.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-profile}"; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=/tmp/lockstep-gpu-profile-bin/lockstep; mkdir -p "$(dirname "$BIN")"
gunzip -c .gpu-bin/lockstep.gz > "$BIN" && chmod +x "$BIN"
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CFG=testdata/configs/qwen3_30b_a3b.json
GEN="${GEN:-128}"
if [[ -z "${SKIP_KERNELS:-}" ]]; then
  echo "== bench-invariant"; timeout 120 "$BIN" bench-invariant --json "$OUT/bench_invariant.json" 2>&1 | tail -30
  for k in invariant standard; do
    echo "== bench-stages $k"; timeout 150 "$BIN" bench-stages --random "$CFG" --kernels "$k" --json "$OUT/stages_$k.json" 2>&1 | tail -14
  done
fi
r() { echo "== bench-serve $*"; timeout "${LIMIT_S:-200}" "$BIN" bench-serve --random "$CFG" --device cuda --dtype bf16 --prompt-len 512 "$@" 2>&1 | grep -v "^kv pool"; }
r --output-len "$GEN" --concurrency 1,64 --capture both --json "$OUT/serve.json"
r --output-len "$GEN" --concurrency 64 --capture on --sampler exact --json "$OUT/serve_exact.json"
