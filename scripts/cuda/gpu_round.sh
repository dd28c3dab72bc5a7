#!/usr/bin/env bash
# One device call for a round of changes (issues #20 / #21): the GPU tests, then the numbers
# they move — a training micro-batch's stages, the engine on the full model, the RL step beside
# the PyTorch peer.
#
#   device run:  bash scripts/cuda/gpu_round.sh
#                carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM", ".gpu-bin/gpu_invariant.gz"]
#
#   1. gpu_invariant (every test; `TESTS=name` to pick some), then every other carried
#      .gpu-bin/gpu_*.gz test binary;
#   2. `bench-stages` at the Qwen3-30B-A3B width (invariant kernels) -> $OUT/stages.json;
#   3. `bench-serve` on the full 48-layer model, bf16, 512-token prompts, GEN (256) generated,
#      concurrency CONC (1,64), capture on -> $OUT/serve.json;
#   4. scripts/cuda/gpu_scale.sh (LAYERS=8 PROMPTS=16 MBT=16384 STEPS=2, no standard run; PHASES=1
#      with the trainer's phase split, no torch peer), then BIG_PROMPTS (e.g. 64) prompts with the
#      torch peer (-> $OUT/scale_big) when set.
# SKIP_TESTS / SKIP_STAGES / SKIP_SERVE / SKIP_SCALE leave a part out; KERNELS=1 adds
# `bench-invariant` (the kernels at decode and training sizes against cuBLAS) -> $OUT/bench_invariant.json.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-round}"; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
B=/tmp/lockstep-round-bin; mkdir -p "$B"
gunzip -c .gpu-bin/lockstep.gz > "$B/lockstep" && chmod +x "$B/lockstep"
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)"
CFG=testdata/configs/qwen3_30b_a3b.json
if [[ -z "${SKIP_TESTS:-}" ]]; then
  gunzip -c .gpu-bin/gpu_invariant.gz > "$B/gpu_invariant" && chmod +x "$B/gpu_invariant"
  echo "== gpu_invariant"
  timeout 240 "$B/gpu_invariant" --test-threads 1 --nocapture ${TESTS:-} 2>&1 | grep -E "^test |test result|panicked|flash backward|max \|Δ|worst|30B width" | tee "$OUT/gpu_invariant.txt"
  for gz in .gpu-bin/gpu_*.gz; do
    name="$(basename "$gz" .gz)"; [[ "$name" == gpu_invariant ]] && continue
    gunzip -c "$gz" > "$B/$name" && chmod +x "$B/$name"
    echo "== $name"
    timeout 120 "$B/$name" --test-threads 1 2>&1 | grep -E "^test |test result|panicked" | tee "$OUT/$name.txt"
  done
fi
if [[ -n "${KERNELS:-}" ]]; then
  echo "== bench-invariant"
  timeout 120 "$B/lockstep" bench-invariant --json "$OUT/bench_invariant.json" 2>&1 | tail -40
fi
if [[ -z "${SKIP_STAGES:-}" ]]; then
  echo "== bench-stages"
  timeout 150 "$B/lockstep" bench-stages --random "$CFG" --kernels invariant --json "$OUT/stages.json" 2>&1 | tail -14
fi
if [[ -z "${SKIP_SERVE:-}" ]]; then
  echo "== bench-serve"
  timeout 200 "$B/lockstep" bench-serve --random "$CFG" --device cuda --dtype bf16 --prompt-len 512 --output-len "${GEN:-256}" \
    --concurrency "${CONC:-1,64}" --capture on --json "$OUT/serve.json" 2>&1 | grep -v "^kv pool" | tail -20
fi
if [[ -z "${SKIP_SCALE:-}" ]]; then
  echo "== gpu_scale"
  env OUT="$OUT/scale" LAYERS=8 PROMPTS=16 MBT=16384 STEPS=2 SKIP_STANDARD=1 ${PHASES:+PHASES=1 SKIP_TORCH=1} bash scripts/cuda/gpu_scale.sh 2>&1 | tail -40
  if [[ -n "${BIG_PROMPTS:-}" ]]; then
    echo "== gpu_scale, $BIG_PROMPTS prompts"
    OUT="$OUT/scale_big" LAYERS=8 PROMPTS="$BIG_PROMPTS" MBT=16384 STEPS=2 SKIP_STANDARD=1 LIMIT_S="${BIG_LIMIT_S:-240}" bash scripts/cuda/gpu_scale.sh 2>&1 | tail -40
  fi
fi
