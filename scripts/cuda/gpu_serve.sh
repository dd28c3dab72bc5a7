#!/usr/bin/env bash
# Serving benchmark on the GPU machine, both sides in one device call (issue #20's table):
#   `lockstep bench-serve --random testdata/configs/qwen3_30b_a3b.json` (weights drawn on the
#   device, bf16, batch-invariant kernels; then kernels = standard) and
#   `scripts/bench/serve_torch.py` (transformers 5.17, same config, random init, bf16, grouped_mm).
#
#   device run:  bash scripts/cuda/gpu_serve.sh     carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
#
# Environment (optional): LAYERS (default: the config's 48), PROMPT (512), OUTPUT (256),
# CONC (1,64,256), TORCH_CONC (1,64), PARTS (lockstep,standard,torch), LIMIT_S per part (240).
# Writes $OUT/serve_*.json and $OUT/serve.log.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-serve}"; mkdir -p "$OUT"
LOG="$OUT/serve.log"; : > "$LOG"
BIN=/tmp/lockstep-gpu-serve-bin/lockstep; mkdir -p "$(dirname "$BIN")"
gunzip -c .gpu-bin/lockstep.gz > "$BIN" && chmod +x "$BIN"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
CFG=testdata/configs/qwen3_30b_a3b.json
PROMPT="${PROMPT:-512}"; OUTPUT="${OUTPUT:-256}"; CONC="${CONC:-1,64,256}"; TORCH_CONC="${TORCH_CONC:-1,64}"
PARTS="${PARTS:-lockstep,standard,torch}"; LIMIT="${LIMIT_S:-240}"
LAYER_ARG=(); TORCH_LAYERS=()
if [[ -n "${LAYERS:-}" ]]; then LAYER_ARG=(--num-layers "$LAYERS"); TORCH_LAYERS=(--layers "$LAYERS"); fi
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
if [[ ",$PARTS," == *",lockstep,"* ]]; then
  echo "== lockstep bench-serve (invariant) layers=${LAYERS:-48} P=$PROMPT O=$OUTPUT conc=$CONC" | tee -a "$LOG"
  timeout "$LIMIT" "$BIN" bench-serve --random "$CFG" "${LAYER_ARG[@]}" --device cuda --dtype bf16 --kernels invariant \
    --prompt-len "$PROMPT" --output-len "$OUTPUT" --concurrency "$CONC" --capture both --json "$OUT/serve_lockstep.json" 2>&1 | tee -a "$LOG"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
if [[ ",$PARTS," == *",standard,"* ]]; then
  echo "== lockstep bench-serve (standard kernels)" | tee -a "$LOG"
  timeout "$LIMIT" "$BIN" bench-serve --random "$CFG" "${LAYER_ARG[@]}" --device cuda --dtype bf16 --kernels standard \
    --prompt-len "$PROMPT" --output-len "$OUTPUT" --concurrency "$CONC" --capture on --json "$OUT/serve_standard.json" 2>&1 | tee -a "$LOG"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
if [[ ",$PARTS," == *",torch,"* ]]; then
  echo "== transformers generate" | tee -a "$LOG"
  timeout "$LIMIT" python3 scripts/bench/serve_torch.py "$CFG" "$PROMPT" "$OUTPUT" "$TORCH_CONC" "${TORCH_LAYERS[@]}" 2>&1 | tee -a "$LOG" | grep '^{' > "$OUT/serve_torch.jsonl"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
