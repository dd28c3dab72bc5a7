#!/usr/bin/env bash
# The batch-invariant kernels on CUDA, on the GPU machine, with the binaries built by
# scripts/cuda/build.sh:
#
#   device run:  bash scripts/cuda/gpu_invariant.sh [--full]      with  carry: [".gpu-bin"]
#
#   1. the gpu_invariant test binary (kernels and whole models batch-invariant on the GPU, the
#      engine's log-probs equal the trainer's, gradients as candle's kernels');
#   2. `lockstep consistency --device cuda`: generate, re-score the trainer's way, max |Δ logprob|
#      with the invariant kernels beside candle's (cuBLAS), f32 and bf16, the default and the wide
#      model, token and expert choice;
#   3. `lockstep serve --device cuda`: a request alone equals it among concurrent others
#      (scripts/cuda/serve_check.py: token ids, log-probabilities, routes);
#   4. `lockstep bench-invariant`: the kernels' time against candle's (cuBLAS);
#   5. `lockstep train --device cuda` with model.kernels = invariant and = standard: wall time
#      and the train-inference mismatch (metrics.jsonl: train_infer_logprob_diff_max and
#      train_infer_kl, the first update of each step, before it); --full: the whole default run,
#      else 5 RL steps after 10 warm-up steps.
# Output: $OUT/invariant.log, $OUT/invariant-summary.txt, $OUT/train-{invariant,standard}.jsonl.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-invariant}"
mkdir -p "$OUT"
LOG="$OUT/invariant.log"; SUMMARY="$OUT/invariant-summary.txt"
: > "$LOG"; : > "$SUMMARY"
BIND=/tmp/lockstep-inv-bin; mkdir -p "$BIND"
gunzip -c .gpu-bin/lockstep.gz > "$BIND/lockstep" && chmod +x "$BIND/lockstep"
gunzip -c .gpu-bin/gpu_invariant.gz > "$BIND/gpu_invariant" && chmod +x "$BIND/gpu_invariant"
BIN="$BIND/lockstep"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
FAILED=0
run() { # name, timeout, command...
  local name="$1" limit="$2"; shift 2
  echo "=== $name: $*" >> "$LOG"
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$OUT/last.out" 2>&1
  local rc=$?
  cat "$OUT/last.out" >> "$LOG"
  [[ $rc -eq 0 ]] || FAILED=1
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s: rc %d (%d.%03d s)\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) | tee -a "$SUMMARY"
  return $rc
}
echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" | tee -a "$SUMMARY"

run "gpu_invariant tests" 400 "$BIND/gpu_invariant" --test-threads 1 --nocapture
grep -E "^test |test result|invariant max|gradients:" "$OUT/last.out" >> "$SUMMARY"

for dtype in f32 bf16; do
  for width in default wide; do
    for routing in token-choice expert-choice; do
      run "consistency cuda $dtype $width $routing" 200 "$BIN" consistency --device cuda --dtype "$dtype" --width "$width" --routing "$routing"
      grep -E "^(invariant|standard) " "$OUT/last.out" | sed "s/^/     [$dtype $width $routing] /" >> "$SUMMARY"
    done
  done
done

# the server on the GPU: a request alone equals the same request among concurrent others
"$BIN" serve --device cuda --port 8765 > "$OUT/serve.out" 2>&1 &
SPID=$!
run "serve --device cuda: alone vs batched" 120 python3 scripts/cuda/serve_check.py http://127.0.0.1:8765
grep -E "alone" "$OUT/last.out" | sed "s/^/     /" >> "$SUMMARY"
kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null

run "bench-invariant" 300 "$BIN" bench-invariant --json "$OUT/bench-invariant.json"
grep -E "^(matmul|attention|wide)" "$OUT/last.out" | sed "s/^/     /" >> "$SUMMARY"

TRAIN=(--quiet --steps 5 --warmup-steps 10)
[[ "${1:-}" == "--full" ]] && TRAIN=(--quiet)
"$BIN" train --print-config | sed 's/^kernels = "invariant"/kernels = "standard"/' > /tmp/standard.toml
for k in invariant standard; do
  CFG=(); [[ $k == standard ]] && CFG=(--config /tmp/standard.toml)
  run "train --device cuda, kernels $k" 500 "$BIN" train --device cuda "${CFG[@]}" "${TRAIN[@]}" --out "/tmp/lockstep-train-$k"
  grep -E "eval accuracy|wall time" "$OUT/last.out" | sed "s/^/     [$k] /" >> "$SUMMARY"
  cp "/tmp/lockstep-train-$k/metrics.jsonl" "$OUT/train-$k.jsonl" 2>/dev/null
  python3 - "/tmp/lockstep-train-$k/metrics.jsonl" "$k" >> "$SUMMARY" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rl = [r for r in rows if r.get("phase") == "rl"]
if rl:
    d = max(r.get("train_infer_logprob_diff_max", float("nan")) for r in rl)
    k = max(r.get("train_infer_kl", float("nan")) for r in rl)
    print(f"     [{sys.argv[2]}] {len(rl)} RL steps: train-inference (first update of each step, before it) max |Δ logprob| {d:.3e}, KL max {k:.3e}; "
          f"mean kl over all updates {sum(r['kl'] for r in rl)/len(rl):.3e}; final reward {rl[-1]['reward_mean']:.3f}")
PY
done
echo "overall: $([[ $FAILED -eq 0 ]] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
exit $FAILED
