#!/usr/bin/env bash
# Run on the GPU machine, from the repo root, with the binary built by scripts/cuda/build.sh:
#
#   device run:  bash scripts/cuda/gpu_check.sh        with  carry: [".gpu-bin"]
#
# Checks, each under a time limit so a hang cannot eat the device budget:
#   1. the GPU and the binary's shared libraries are found;
#   2. `lockstep verify --device cuda` against every transformers reference dump in testdata
#      (and the same on the CPU of that machine, for comparison);
#   3. `lockstep demo --device cuda` (record → replay must give max |Δ logits| = 0e0) and
#      `--device cpu`, for token choice and expert choice.
# Everything is written to $OUT/gpu_check.log (the whole log) and $OUT/summary.txt (one line a
# check); the device tool returns at most 8 files, so everything goes into those two.
# Exit status: 0 when every check passed, 1 otherwise. Nothing here stops at the first failure.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"; : > "$SUMMARY"
# build.sh leaves the binary gzipped (.gpu-bin/lockstep.gz) to fit the device call's 64 MiB.
BIN="${LOCKSTEP_BIN:-}"
if [[ -z "$BIN" ]]; then
  BIN=/tmp/lockstep-gpu-check-bin/lockstep
  mkdir -p "$(dirname "$BIN")"
  if [[ -f "$ROOT/.gpu-bin/lockstep.gz" ]]; then
    gunzip -c "$ROOT/.gpu-bin/lockstep.gz" > "$BIN" && chmod +x "$BIN"
  elif [[ -x "$ROOT/.gpu-bin/lockstep" ]]; then
    BIN="$ROOT/.gpu-bin/lockstep"
  fi
fi
# The CUDA 13.0 toolkit (cuBLAS, cuRAND, NVRTC) lives here on the GPU machine; libcuda.so.1
# comes from the driver on the default search path.
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
LIMIT="${CHECK_TIMEOUT_S:-180}"
FAILED=0
TMPD="$(mktemp -d)"
LAST_OUT=/dev/null   # output file of the latest check

log() { echo "$*" | tee -a "$LOG"; }

# check NAME CMD...: run CMD with a time limit, log its output, record ok/FAIL with the wall time.
check() {
  local name="$1"; shift
  log ""
  log "### $name"
  log "\$ $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  LAST_OUT="$TMPD/$(echo "$name" | tr -c 'A-Za-z0-9_.-' '_').out"
  timeout "$LIMIT" "$@" 2>&1 | tee "$LAST_OUT" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  if [[ $rc -eq 0 ]]; then
    printf '%-4s %-58s %7ss\n' ok "$name" "$secs" | tee -a "$LOG" >> "$SUMMARY"
  else
    [[ $rc -eq 124 ]] && log "(timed out after ${LIMIT}s)"
    printf '%-4s %-58s %7ss  rc=%s\n' FAIL "$name" "$secs" "$rc" | tee -a "$LOG" >> "$SUMMARY"
    FAILED=1
  fi
  return 0
}

log "=== lockstep GPU check $(date -u +%FT%TZ) on $(hostname)"
log "repo commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); binary built from: $(cat "$ROOT/.gpu-bin/BUILT_FROM" 2>/dev/null || echo unknown)"

check "nvidia-smi -L" nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"

if [[ ! -x "$BIN" ]]; then
  log "FATAL: $BIN missing: build it with scripts/cuda/build.sh and pass carry: [\".gpu-bin\"]"
  echo "FAIL binary present" >> "$SUMMARY"
  exit 1
fi
log ""
log "### shared libraries of $BIN"
ldd "$BIN" 2>&1 | tee -a "$LOG"
if ldd "$BIN" 2>&1 | grep -q "not found"; then
  log "FATAL: a shared library is missing (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
  echo "FAIL shared libraries resolved" >> "$SUMMARY"
  exit 1
fi
check "lockstep --version" "$BIN" --version

# Every checkpoint that has a transformers reference dump.
FIXTURES=()
for d in testdata/fixtures/*/ testdata/extra_fixtures/*/; do
  d="${d%/}"
  [[ -f "$d/config.json" && -f "$d/reference.safetensors" ]] && FIXTURES+=("$d")
done
log ""
log "fixtures: ${FIXTURES[*]}"

for dev in cuda cpu; do
  for d in "${FIXTURES[@]}"; do
    check "verify --device $dev $(basename "$d")" \
      "$BIN" verify --device "$dev" --model "$d" --reference "$d/reference.safetensors"
    # worst relative error of the table (columns counted from the right: quantity names have spaces)
    awk -v tag="[$dev $(basename "$d")]" '
      ($NF=="ok" || $NF=="FAIL") && $(NF-2) ~ /^[0-9.]+e/ {
        n++; if ($(NF-2)+0 >= worst) { worst=$(NF-2)+0; q=$2; for (i=3;i<=NF-4;i++) q=q" "$i; c=$1 } }
      /checks within|beyond/ { tail=$0 }
      NF { last=$0 }
      END { if (n) printf "     %s worst max rel %.3e (%s %s); %s\n", tag, worst, c, q, tail
            else   printf "     %s no table: %s\n", tag, last }' "$LAST_OUT" >> "$SUMMARY"
  done
done

# bf16 model (weights and activations bf16; router scores f32) against the f32 references,
# under the tolerance documented in README "GPU" (the same as crates/model/tests/parity.rs)
for dev in cuda cpu; do
  for d in testdata/fixtures/*/; do
    d="${d%/}"
    [[ -f "$d/reference.safetensors" ]] || continue
    check "verify --dtype bf16 --device $dev $(basename "$d")" \
      "$BIN" verify --device "$dev" --dtype bf16 --tolerance 3e-2 --free-tolerance 0.3 --min-route-agreement 0.9 \
      --model "$d" --reference "$d/reference.safetensors"
    awk -v tag="[bf16 $dev $(basename "$d")]" '
      ($NF=="ok" || $NF=="FAIL") && $(NF-2) ~ /^[0-9.]+e/ {
        if ($1=="replay") { if ($(NF-2)+0 > rw) rw=$(NF-2)+0 } else if ($(NF-2)+0 > fw && $(NF-1)=="-") fw=$(NF-2)+0
        if ($(NF-1) ~ /%$/) { a=$(NF-1)+0; if (min=="" || a < min) min=a } }
      END { printf "     %s worst rel: replay %.3e, free %.3e; lowest route agreement %s%%\n", tag, rw, fw, min }' "$LAST_OUT" >> "$SUMMARY"
  done
done

# GPU-only tests (routing kernels against their host definition, device checks of forced
# routes, model routing / replay on the GPU), built by build.sh into .gpu-bin/gpu_*.gz
for gz in "$ROOT"/.gpu-bin/gpu_*.gz; do
  [[ -f "$gz" ]] || continue
  name="$(basename "$gz" .gz)"
  exe="$(dirname "$BIN")/$name"
  gunzip -c "$gz" > "$exe" && chmod +x "$exe"
  check "cargo test $name (CUDA)" "$exe" --test-threads 1
  grep -E "^test result" "$LAST_OUT" | sed "s/^/     [$name] /" >> "$SUMMARY"
done

# gradients (a masked policy-gradient loss under forced routes) against PyTorch's, where a
# grads.safetensors exists: on CUDA this runs the grouped-GEMM custom ops' backward
for dev in cuda cpu; do
  for d in "${FIXTURES[@]}"; do
    [[ -f "$d/grads.safetensors" ]] || continue
    check "verify --grads --device $dev $(basename "$d")" \
      "$BIN" verify --device "$dev" --model "$d" --reference "$d/reference.safetensors" --grads "$d/grads.safetensors"
    grep -E "checks within|beyond" "$LAST_OUT" | tail -1 | sed "s/^/     [grads $dev $(basename "$d")] /" >> "$SUMMARY"
  done
done

# demo: record → replay must be bitwise (0e0) on either device. Expert choice over a pool wider
# than one token needs non-causal attention (the CLI refuses the future leak otherwise); the
# 16 × 256 batch pool makes each expert rank 3136 tokens (a sort well past 1024 columns on the GPU).
DEMOS=(
  "token-choice|--routing token-choice"
  "token-choice-16x256|--routing token-choice --batch 16 --len 256"
  "expert-choice-block1|--routing expert-choice --pool block:1"
  "expert-choice-seq-bidir|--routing expert-choice --attention bidirectional --pool sequence"
  "expert-choice-batch-bidir-16x256|--routing expert-choice --attention bidirectional --pool batch --batch 16 --len 256"
)
for entry in "${DEMOS[@]}"; do
  tag="${entry%%|*}"; read -r -a dargs <<< "${entry#*|}"
  for dev in cuda cpu; do
    check "demo --device $dev ${dargs[*]}" "$BIN" demo --device "$dev" "${dargs[@]}"
    # keep the replay lines in the summary: they are the point of the demo
    grep -E "max \|Δ logits\|" "$LAST_OUT" | sed "s/^/     [$dev $tag] /" >> "$SUMMARY"
  done
done

log ""
log "=== summary"
cat "$SUMMARY" | tee -a "$LOG"
[[ $FAILED -eq 0 ]] && log "ALL CHECKS PASSED" || log "SOME CHECKS FAILED"
exit $FAILED
