#!/usr/bin/env bash
# `lockstep bench-graph` on the full Qwen3-30B-A3B (random, bf16): one decode step eager vs a
# captured CUDA graph replayed, at BATCH (1,64) sequences of CONTEXT (512) cached tokens.
#   device run:  bash scripts/cuda/gpu_probe.sh     carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-probe}"; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
B=/tmp/lockstep-probe-bin; mkdir -p "$B"
gunzip -c .gpu-bin/lockstep.gz > "$B/lockstep" && chmod +x "$B/lockstep"
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)"
timeout "${PROBE_TIMEOUT_S:-200}" "$B/lockstep" bench-graph --random testdata/configs/qwen3_30b_a3b.json ${LAYERS:+--num-layers $LAYERS} \
  --batch "${BATCH:-1,64}" --context "${CONTEXT:-512}" --iters "${ITERS:-20}" --json "$OUT/graph.json" 2>&1 | tail -20
