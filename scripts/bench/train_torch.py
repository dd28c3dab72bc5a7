"""The transformers peer of `lockstep bench-rl`'s trainer: the same micro-batches (token counts per
micro-batch, sequence lengths, mini-steps) through transformers 5.17 `AutoModelForCausalLM` built
from the same config.json with random weights on the GPU (Qwen3MoeForCausalLM for
testdata/configs/qwen3_30b_a3b.json), experts_implementation "grouped_mm" (the from_config kwarg,
as scripts/bench/serve_torch.py), f32 master weights with bf16 autocast, fused torch AdamW,
activation checkpointing (gradient_checkpointing_enable), and a policy-gradient loss on the
completion tokens' log-probabilities: loss = -sum(A * log pi(y)) / completion tokens of the
mini-step. One optimizer step per mini-step, as lockstep. No rollouts: random token ids.

FLOPs are counted exactly as lockstep's (crates/rl/src/bench.rs): per token 6 * N_act, N_act the
matmul weights one token passes (q, k, v, o, router, its top-k experts, shared experts, dense MLPs,
LM head), plus per layer 6 * (2 * c * d_attn) with c = position + 1 (causal); model FLOPs (the
recomputation of activation checkpointing is not counted). MFU = FLOPs / (fwd + bwd + optimizer
time) / peak. The first step is a warm-up, left out of the means.

usage:
  python3 train_torch.py --config CONFIG.json [--num-layers N] --shapes bench_rl.json [--out r.json]
  python3 train_torch.py --config CONFIG.json --prompt-len 512 --gen-len 256 --prompts 8 --group 8 \
      --micro-batch-tokens 8192 --mini-steps 2 [--steps 4] [--peak-tflops 989]
--shapes takes the micro-batches and the workload from `lockstep bench-rl --out`'s JSON.
"""
import argparse, json, math, os, tempfile, time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--num-layers", type=int)
ap.add_argument("--shapes", help="bench-rl result JSON: micro_batches and workload")
ap.add_argument("--prompt-len", type=int, default=512)
ap.add_argument("--gen-len", type=int, default=256)
ap.add_argument("--prompts", type=int, default=8)
ap.add_argument("--group", type=int, default=8)
ap.add_argument("--micro-batch-tokens", type=int, default=8192)
ap.add_argument("--mini-steps", type=int, default=2)
ap.add_argument("--steps", type=int)
ap.add_argument("--lr", type=float, default=1e-6)
ap.add_argument("--peak-tflops", type=float, default=989.0)
ap.add_argument("--no-checkpointing", action="store_true")
ap.add_argument("--out")
a = ap.parse_args()


def pack_like_lockstep(prompts, group, seq_len, budget, mini_steps):
    """Whole groups per mini-step; every sequence has seq_len tokens, so first-fit-decreasing
    fills each micro-batch with budget // seq_len sequences."""
    per = math.ceil(prompts / mini_steps)
    per_mb = budget // seq_len
    minis = []
    for first in range(0, prompts, per):
        n = (min(prompts, first + per) - first) * group
        minis.append([[seq_len] * min(per_mb, n - i) for i in range(0, n, per_mb)])
    return minis


if a.shapes:
    with open(a.shapes) as f:
        r = json.load(f)
    w = r["workload"]
    minis = r["micro_batches"]
    prompt_len, gen_len, steps = w["prompt_len"], w["gen_len"], a.steps or w["steps"]
else:
    prompt_len, gen_len, steps = a.prompt_len, a.gen_len, a.steps or 4
    minis = pack_like_lockstep(a.prompts, a.group, prompt_len + gen_len, a.micro_batch_tokens, a.mini_steps)
if steps < 1:
    raise SystemExit("--steps must be >= 1")

# bf16 autocast does not necessarily cover torch._grouped_mm (transformers' grouped_mm experts
# call it on the f32 master weights, and an f32 grouped mm takes a slow per-group fallback): cast
# both operands to bf16 under autocast, as autocast does for a linear layer (a no-op where the
# torch build already autocasts it). The casts are differentiable: gradients reach the f32 weights.
def _bf16_under_autocast(fn):
    def wrapped(a_, b_, *args, **kwargs):
        try:
            on = torch.is_autocast_enabled("cuda")
        except TypeError:
            on = torch.is_autocast_enabled()
        if on:
            a_, b_ = a_.to(torch.bfloat16), b_.to(torch.bfloat16)
        return fn(a_, b_, *args, **kwargs)
    return wrapped


if hasattr(torch, "_grouped_mm"):
    torch._grouped_mm = _bf16_under_autocast(torch._grouped_mm)
if hasattr(torch.nn.functional, "grouped_mm"):
    torch.nn.functional.grouped_mm = _bf16_under_autocast(torch.nn.functional.grouped_mm)

with open(a.config) as f:
    raw = json.load(f)
if a.num_layers:
    raw["num_hidden_layers"] = a.num_layers
d = tempfile.mkdtemp()
with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(raw, f)
cfg = AutoConfig.from_pretrained(d)
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    try:
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="grouped_mm"); impl = "grouped_mm"
    except TypeError:
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32); impl = "default"
m.config.use_cache = False
if not a.no_checkpointing:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=a.lr, fused=True)
params = sum(p.numel() for p in m.parameters())
print(json.dumps({"init_s": round(time.time() - t0, 1), "params_b": round(params / 1e9, 3), "impl": impl, "layers": cfg.num_hidden_layers,
                  "model": type(m).__name__, "micro_batches": minis}), flush=True)


def n_act(c):
    """Matmul weights one token passes through in a forward (lockstep's active_matmul_params)."""
    dm = c.hidden_size
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or dm // heads
    attn = 2 * dm * heads * hd + 2 * dm * kv * hd
    n_exp = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or getattr(c, "n_routed_experts")
    k = c.num_experts_per_tok
    moe = dm * n_exp + k * 3 * dm * c.moe_intermediate_size
    shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
    if shared:
        moe += 3 * dm * shared + dm
    dense = 3 * dm * (getattr(c, "intermediate_size", 0) or 0)
    L = c.num_hidden_layers
    mlp_only = set(getattr(c, "mlp_only_layers", []) or [])
    step = getattr(c, "decoder_sparse_step", 1) or 1
    first_dense = getattr(c, "first_k_dense_replace", 0) or 0
    n_moe = sum(1 for l in range(L) if l not in mlp_only and (l + 1) % step == 0 and l >= first_dense)
    return L * attn + n_moe * moe + (L - n_moe) * dense + c.vocab_size * dm


def train_flops(c, lens):
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d_attn = c.num_attention_heads * hd
    return sum(6 * n_act(c) * t + c.num_hidden_layers * 6 * 2 * d_attn * t * (t + 1) / 2 for t in lens)


g = torch.Generator(device="cuda").manual_seed(0)
vocab = cfg.vocab_size


def micro_step(lens, denom):
    """Forward + backward of one micro-batch (sequences padded to the longest; lockstep packs
    them: with equal lengths, as here, the tokens are the same)."""
    T = max(lens)
    B = len(lens)
    ids = torch.randint(0, vocab, (B, T), device="cuda", generator=g)
    att = torch.zeros(B, T, dtype=torch.long, device="cuda")
    loss_mask = torch.zeros(B, T - 1, device="cuda")
    for i, t in enumerate(lens):
        att[i, :t] = 1
        loss_mask[i, max(prompt_len - 1, 0):t - 1] = 1.0  # predictions of the completion tokens
    adv = torch.randn(B, 1, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = m(input_ids=ids, attention_mask=att).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(adv * logp * loss_mask).sum() / denom
    loss.backward()
    return loss.detach()


records = []
torch.cuda.reset_peak_memory_stats()
for s in range(steps):
    torch.cuda.synchronize(); t = time.time()
    fb = op = 0.0
    losses = []
    for mini in minis:
        denom = sum(max(0, t_ - prompt_len) for mb in mini for t_ in mb) or 1
        torch.cuda.synchronize(); t1 = time.time()
        for mb in mini:
            losses.append(micro_step(mb, denom))
        torch.cuda.synchronize(); t2 = time.time()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); t3 = time.time()
        fb += t2 - t1; op += t3 - t2
    dt = time.time() - t
    lens = [t_ for mini in minis for mb in mini for t_ in mb]
    fl = train_flops(cfg, lens)
    rec = {"step": s + 1, "warmup": s == 0, "train_step_s": dt, "fwd_bwd_s": fb, "optimizer_s": op, "trainer_tokens": sum(lens),
           "train_flops": fl, "trainer_tokens_per_s": sum(lens) / dt, "mfu": fl / dt / 1e12 / a.peak_tflops,
           "loss": float(torch.stack(losses).sum()), "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    records.append(rec)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)

used = records[1:] if len(records) > 1 else records
mean = lambda k: sum(r[k] for r in used) / len(used)
step_s = mean("train_step_s")
result = {
    "peer": f"transformers-{impl}", "model": type(m).__name__, "layers": cfg.num_hidden_layers, "parameters": params,
    "active_matmul_params_per_token": n_act(cfg), "precision": "f32 master weights, bf16 autocast (grouped mm operands cast to bf16), fused AdamW",
    "activation_checkpointing": not a.no_checkpointing, "loss": "policy gradient on completion log-probs",
    "prompt_len": prompt_len, "gen_len": gen_len, "micro_batches": minis, "warmup_steps_excluded": int(len(records) > 1),
    "averaged_steps": [r["step"] for r in used],
    "trainer_tokens_per_s": mean("trainer_tokens") / step_s, "train_tflops_per_s": mean("train_flops") / step_s / 1e12,
    "mfu": mean("train_flops") / step_s / 1e12 / a.peak_tflops, "peak_tflops": a.peak_tflops,
    "time_split_s": {"fwd_bwd": mean("fwd_bwd_s"), "optimizer": mean("optimizer_s"), "step": step_s},
    "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
    "steps": records,
}
print(json.dumps({k: result[k] for k in ["peer", "trainer_tokens_per_s", "train_tflops_per_s", "mfu", "peak_memory_gb", "time_split_s"]}), flush=True)
if a.out:
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
