#!/usr/bin/env bash
# Run on the GPU machine, from the repo root, with the binary built by scripts/cuda/build.sh:
#
#   device run:  bash scripts/cuda/gpu_bench.sh [--no-torch] [--quick]     carry: [".gpu-bin"]
#
# One MoE expert layer, bf16, forward + backward and forward-only at decode sizes:
#   1. `lockstep bench-moe --shapes small --check` (a fast sanity check of every GEMM path);
#   2. `lockstep bench-moe --shapes a,b --check` (lockstep's CUDA ops: grouped / padded / loop);
#   3. `scripts/bench/moe_layer_torch.py` (PyTorch: HF eager loop, torch._grouped_mm, compiled);
#   4. a side-by-side table from both JSON files.
# Output: $OUT/bench.log, $OUT/lockstep_moe_bench.json, $OUT/torch_moe_bench.json, $OUT/compare.txt
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-bench}"
mkdir -p "$OUT"
LOG="$OUT/bench.log"
TORCH=1; QUICK=()
for a in "$@"; do
  case "$a" in
    --no-torch) TORCH=0 ;;
    --quick) QUICK=(--warmup 1 --iters 3) ;;
    *) echo "gpu_bench.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
BIN="${LOCKSTEP_BIN:-/tmp/lockstep-gpu-check-bin/lockstep}"
if [[ ! -x "$BIN" ]]; then
  mkdir -p "$(dirname "$BIN")"
  gunzip -c "$ROOT/.gpu-bin/lockstep.gz" > "$BIN" && chmod +x "$BIN" || { echo "no binary: carry .gpu-bin" | tee -a "$LOG"; exit 1; }
fi
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
FAILED=0
step() { echo; echo "### $*" | tee -a "$LOG"; }
run_limited() { local lim="$1"; shift; timeout "$lim" "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [[ $rc -eq 0 ]] || { echo "(rc=$rc)" | tee -a "$LOG"; FAILED=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
step "1. sanity: small shape, every GEMM path, checked against the f32 reference"
run_limited 120 "$BIN" bench-moe --shapes small --check --warmup 1 --iters 3 --decode 16
step "2. lockstep bench-moe (shapes a, b)"
run_limited 400 "$BIN" bench-moe --shapes a,b --check "${QUICK[@]}" --json "$OUT/lockstep_moe_bench.json"
if [[ $TORCH -eq 1 ]]; then
  step "3. PyTorch reference"
  TQ=(); [[ ${#QUICK[@]} -gt 0 ]] && TQ=(--quick)
  run_limited 300 python3 scripts/bench/moe_layer_torch.py "${TQ[@]}" --out "$OUT/torch_moe_bench.json"
fi
step "4. side by side"
python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/compare.txt" | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else []
ls = load("lockstep_moe_bench.json")
ts = load("torch_moe_bench.json")
ts = ts.get("records", ts) if isinstance(ts, dict) else ts
rows = []
for r in ls:
    if r.get("kind") in ("fwd_bwd", "forward"):
        rows.append((r["kind"], r["shape"].upper(), r["T"], "lockstep/" + r["impl"], r["ms_median"], r["tflops"]))
for r in ts:
    kind = r.get("mode") or r.get("kind")
    if kind is None or "ms_median" not in r:
        continue
    kind = "fwd_bwd" if "bwd" in str(kind) or "train" in str(kind) else "forward"
    rows.append((kind, str(r.get("shape", "?")).upper(), r.get("T"), "torch/" + str(r.get("impl")), r["ms_median"], r.get("tflops", float("nan"))))
rows.sort(key=lambda x: (x[0], x[1], x[2] or 0, x[4]))
print(f"{'mode':8} {'shape':5} {'T':>6} {'implementation':32} {'ms':>9} {'TFLOP/s':>8}")
for k, s, t, i, ms, tf in rows:
    print(f"{k:8} {s:5} {t if t is not None else '':>6} {i:32} {ms:9.3f} {tf:8.1f}")
PY
exit $FAILED
