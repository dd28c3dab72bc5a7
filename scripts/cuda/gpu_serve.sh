#!/usr/bin/env bash
# Serving benchmark on the GPU machine, both sides in one device call (issue #20's table): the
# full Qwen3-30B-A3B (testdata/configs/qwen3_30b_a3b.json, 48 layers, 30.5B parameters) with
# random weights drawn on the device, bf16, 512-token prompts:
#   - `lockstep bench-serve` (batch-invariant kernels): 256 generated at concurrency 1 and 64,
#     128 generated at 256; capture off at 64; then kernels = standard (cuBLAS) at 1 and 64;
#   - `scripts/bench/serve_torch.py` (transformers 5.17, same config, random init, bf16,
#     grouped_mm), 64 generated at 1 and 64 (its step time does not depend on the length much).
#
#   device run:  bash scripts/cuda/gpu_serve.sh     carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
#
# LAYERS=N runs a shallower model of the same width (both sides). Each part has a time limit.
# Writes $OUT/*.json(l) and prints the tables.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-serve}"; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=/tmp/lockstep-gpu-serve-bin/lockstep; mkdir -p "$(dirname "$BIN")"
gunzip -c .gpu-bin/lockstep.gz > "$BIN" && chmod +x "$BIN"
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CFG=testdata/configs/qwen3_30b_a3b.json
LA=(); TL=()
if [[ -n "${LAYERS:-}" ]]; then LA=(--num-layers "$LAYERS"); TL=(--layers "$LAYERS"); fi
r() { echo "== bench-serve $*"; timeout "${LIMIT_S:-200}" "$BIN" bench-serve --random "$CFG" "${LA[@]}" --device cuda --dtype bf16 --prompt-len 512 "$@" 2>&1 | grep -v "^kv pool"; }
r --output-len 256 --concurrency 1,64 --capture on --json "$OUT/invariant_256.json"
r --output-len 128 --concurrency 256 --capture on --json "$OUT/invariant_c256.json"
r --output-len 128 --concurrency 64 --capture off --json "$OUT/invariant_nocapture.json"
r --output-len 128 --concurrency 1,64 --capture on --kernels standard --json "$OUT/standard.json"
echo "== transformers generate"
timeout 150 python3 scripts/bench/serve_torch.py "$CFG" 512 64 1,64 "${TL[@]}" 2>&1 | grep '^{' | tee "$OUT/torch.jsonl"
