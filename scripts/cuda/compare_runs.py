#!/usr/bin/env python3
"""Compare two `lockstep train` metrics.jsonl files step by step: rewards, completion tokens and
held-out accuracy must be identical (the same completions), losses, KL, gradient norms and
entropy within a relative 1e-4, per-layer max_vio and route agreement identical (the same routes).
Used by scripts/cuda/gpu_dist.sh (launch over W GPUs against one GPU). Exit 1 on a mismatch.

With the batch-invariant kernels (model.kernels = "invariant", the default, on the CPU and on
CUDA) W ranks sample exactly one rank's completions, so the comparison is strict. With
--report-only, print the differences and exit 0: for runs with model.kernels = "standard"
(cuBLAS is not batch-invariant, so W > 1 ranks' other decode batches round differently from one
GPU and sampled completions may part). crates/rl/tests/ranks.rs compares CPU runs likewise."""
import json
import sys


def load(p):
    with open(p) as f:
        return [json.loads(l) for l in f if l.strip()]


def close(a, b):
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-3)


args = [x for x in sys.argv[1:] if not x.startswith("--")]
report_only = "--report-only" in sys.argv
a, b = load(args[0]), load(args[1])
bad = []
if len(a) != len(b):
    bad.append(f"{len(a)} records vs {len(b)}")
for x, y in zip(a, b):
    tag = f"{x['phase']} step {x['step']}"
    for k in ("reward_mean", "completion_tokens", "eval_accuracy"):
        if x.get(k) != y.get(k):
            bad.append(f"{tag} {k}: {x.get(k)} vs {y.get(k)}")
    for k in ("loss", "kl", "grad_norm", "entropy"):
        if not close(x[k], y[k]):
            bad.append(f"{tag} {k}: {x[k]} vs {y[k]}")
    for l, p in x["layers"].items():
        q = y["layers"].get(l)
        if q is None or (p["max_vio"], p["route_agreement"]) != (q["max_vio"], q["route_agreement"]):
            bad.append(f"{tag} layer {l}: {p} vs {q}")
rl = [x for x in a if x["phase"] == "rl"]
if bad:
    print(("differences (report only):" if report_only else "MISMATCH:") + "\n  " + "\n  ".join(bad))
    sys.exit(0 if report_only else 1)
print(f"runs match: {len(rl)} RL steps, rewards {[round(x['reward_mean'], 4) for x in rl]}, "
      f"losses {['%.4g' % x['loss'] for x in rl]} (relative tolerance 1e-4)")
