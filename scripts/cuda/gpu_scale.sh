#!/usr/bin/env bash
# RL-step benchmark on the GPU machine, both sides in one device call (issue #21): the
# Qwen3-30B-A3B width (testdata/configs/qwen3_30b_a3b.json) cut to LAYERS (default 8) layers,
# random weights drawn on the device, the same synthetic workload on both sides:
#   - `lockstep bench-rl`: rollouts through the in-process engine (bf16 weights, invariant
#     kernels), pi_old scoring, fwd+bwd+AdamW (bf16 compute with f32 master weights and moments,
#     activation checkpointing: the torch peer's precision), weight sync; -> $OUT/bench_rl.json
#   - `scripts/bench/train_torch.py`: transformers 5.17 Qwen3MoeForCausalLM (grouped_mm, f32
#     master weights + bf16 autocast, fused AdamW, activation checkpointing) on the micro-batches
#     bench-rl recorded (read from its JSON); -> $OUT/train_torch.json
#   then `bench-rl --kernels standard` (cuBLAS) -> $OUT/bench_rl_standard.json.
#
#   device run:  bash scripts/cuda/gpu_scale.sh     carry: [".gpu-bin/lockstep.gz", ".gpu-bin/BUILT_FROM"]
#
# Knobs (environment): LAYERS, PROMPT_LEN (512), GEN_LEN (256), PROMPTS (8), GROUP (8),
# MBT (micro-batch tokens, 8192), MINI (mini-steps, 2), STEPS (4), PEAK (989 TFLOP/s),
# TRAINER_DTYPE (bf16; f32 = lockstep train's default), CKPT (1: activation checkpointing),
# LIMIT_S (seconds per part, 280), SKIP_STANDARD (set: no standard-kernels run), SKIP_TORCH (set: no
# transformers peer), PHASES (set: `--time-phases`, the trainer's per-phase split; syncs the
# device at each phase's end). Prints the summaries.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/lockstep-gpu-scale}"; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${CUDA_LIB_DIR:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=/tmp/lockstep-gpu-scale-bin/lockstep; mkdir -p "$(dirname "$BIN")"
gunzip -c .gpu-bin/lockstep.gz > "$BIN" && chmod +x "$BIN"
echo "built from: $(cat .gpu-bin/BUILT_FROM 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CFG=testdata/configs/qwen3_30b_a3b.json
LAYERS="${LAYERS:-8}"
PROMPT_LEN="${PROMPT_LEN:-512}"; GEN_LEN="${GEN_LEN:-256}"; PROMPTS="${PROMPTS:-8}"; GROUP="${GROUP:-8}"
MBT="${MBT:-8192}"; MINI="${MINI:-2}"; STEPS="${STEPS:-4}"; PEAK="${PEAK:-989}"; LIMIT_S="${LIMIT_S:-280}"
TRAINER_DTYPE="${TRAINER_DTYPE:-bf16}"; CKPT="${CKPT:-1}"
SHAPE=(--prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" --prompts "$PROMPTS" --group "$GROUP"
       --micro-batch-tokens "$MBT" --mini-steps "$MINI" --steps "$STEPS" --peak-tflops "$PEAK"
       --trainer-dtype "$TRAINER_DTYPE")
TORCH_CKPT=()
if [[ -n "${PHASES:-}" ]]; then SHAPE+=(--time-phases); fi
if [[ "$CKPT" == 1 ]]; then SHAPE+=(--activation-checkpointing); else TORCH_CKPT=(--no-checkpointing); fi
status=0

echo "== lockstep bench-rl (invariant kernels), $LAYERS layers"
timeout "$LIMIT_S" "$BIN" bench-rl --random "$CFG" --num-layers "$LAYERS" --device cuda --dtype bf16 \
    "${SHAPE[@]}" --out "$OUT/bench_rl.json" 2>&1 | tee "$OUT/bench_rl.log" || status=1

if [[ -z "${SKIP_TORCH:-}" ]]; then
echo "== transformers trainer peer on the same micro-batches"
if [[ -s "$OUT/bench_rl.json" ]]; then
    SHAPES=(--shapes "$OUT/bench_rl.json")
else
    echo "(no bench_rl.json: the peer packs the same shapes from the flags)"
    SHAPES=(--prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" --prompts "$PROMPTS" --group "$GROUP"
            --micro-batch-tokens "$MBT" --mini-steps "$MINI" --steps "$STEPS")
fi
timeout "$LIMIT_S" python3 scripts/bench/train_torch.py --config "$CFG" --num-layers "$LAYERS" "${SHAPES[@]}" "${TORCH_CKPT[@]}" \
    --peak-tflops "$PEAK" --out "$OUT/train_torch.json" 2>&1 | grep -v '^\s*$' | tee "$OUT/train_torch.log" || status=1
fi

if [[ -z "${SKIP_STANDARD:-}" ]]; then
echo "== lockstep bench-rl (standard kernels: cuBLAS), $LAYERS layers"
timeout "$LIMIT_S" "$BIN" bench-rl --random "$CFG" --num-layers "$LAYERS" --device cuda --dtype bf16 --kernels standard \
    "${SHAPE[@]}" --out "$OUT/bench_rl_standard.json" 2>&1 | tee "$OUT/bench_rl_standard.log" || status=1
fi

echo "== summary"
python3 - "$OUT" <<'PY' || status=1
import json, os, sys
out = sys.argv[1]
for name in ["bench_rl.json", "bench_rl_standard.json", "train_torch.json"]:
    p = os.path.join(out, name)
    if not os.path.exists(p):
        print(f"{name:24s} missing"); continue
    r = json.load(open(p))
    split = r.get("time_split_s", {})
    print(f"{name:24s} trainer {r['trainer_tokens_per_s']:10.1f} tok/s  MFU {100 * r['mfu']:6.2f}%  "
          f"rollout {r.get('rollout_tokens_per_s', float('nan')):9.1f} tok/s  peak {r['peak_memory_gb']:6.1f} GB  "
          + " ".join(f"{k} {v:.3f}s" for k, v in split.items()))
    plan = r.get("memory_plan")
    if plan:
        tp = [s.get("train_peak_memory_gb") for s in r.get("steps", []) if not s.get("warmup")]
        print(f"{'':24s} memory plan {plan['total_gb']:.1f} GB ({plan['bytes_per_parameter_states']:.0f} B/parameter states + activations {plan['activations_gb']:.1f} GB + head {plan['head_chunk_gb']:.1f} GB); trainer peak {tp} GB")
PY
exit $status
