"""More reference fixtures, dumped exactly like testdata/fixtures/make_fixtures.py (whose helpers
this imports), for shapes the shipped fixtures do not cover: dense layers between MoE layers,
more experts, top-4, no renormalisation, tied embeddings, MQA, bf16 weights and a sharded
checkpoint. Run on the GPU machine (transformers 5.17, PyTorch 2.11; CPU float32 compute):

    OUT=/some/dir python3 scripts/make_extra_fixtures.py

Writes <name>.tar.gz per fixture into $OUT (unpacked under testdata/extra_fixtures/).
"""
import copy, json, os, sys, tarfile
import torch
from safetensors.torch import save_file, load_file
import transformers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen2MoeConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "testdata", "fixtures"))
import make_fixtures as mf  # noqa: E402


def make(name, cfg_cls, cfg_kwargs, seed, outdir, bf16_weights=False, shard=None):
    torch.manual_seed(seed)
    cfg = cfg_cls(**cfg_kwargs)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.8, 1.2)
        if bf16_weights:  # the reference then sees exactly the weights a bf16 file holds
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    d = os.path.join("/tmp/fx", name)
    os.makedirs(d, exist_ok=True)
    # a copy: Module.to() casts in place, buffers too (RoPE's inv_freq would be rounded)
    to_save = copy.deepcopy(model).to(torch.bfloat16) if bf16_weights else model
    kw = {"max_shard_size": shard} if shard else {}
    to_save.save_pretrained(d, safe_serialization=True, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    logits, caps = mf.capture(model, ids)
    ref = {"input_ids": ids.to(torch.int64), "logits": logits.contiguous()}
    selected = []
    for li, inp, outs in caps:
        probs, weights, idx = outs
        ref[f"layer{li}.router_input"] = inp.float().reshape(-1, inp.shape[-1]).contiguous()
        ref[f"layer{li}.router_probs"] = probs.float().contiguous()
        ref[f"layer{li}.topk_weights"] = weights.float().contiguous()
        ref[f"layer{li}.topk_idx"] = idx.to(torch.int64).contiguous()
        selected.append(idx)
    with torch.no_grad():
        for r in mf.routers(model):
            r.weight.add_(torch.randn(r.weight.shape, generator=g) * 0.05)
    free_logits, free_caps = mf.capture(model, ids)
    rep_logits, rep_caps = mf.capture(model, ids, forced=selected)
    ref["perturbed.free_logits"] = free_logits.contiguous()
    ref["replay.logits"] = rep_logits.contiguous()
    for li, r in enumerate(mf.routers(model)):
        ref[f"perturbed.layer{li}.router_weight"] = r.weight.detach().float().contiguous()
        ref[f"perturbed.layer{li}.free_topk_idx"] = free_caps[li][2][2].to(torch.int64).contiguous()
        ref[f"replay.layer{li}.topk_weights"] = rep_caps[li][2][1].float().contiguous()
    changed = sum(int((free_caps[li][2][2].sort(-1).values != selected[li].sort(-1).values).any(-1).sum())
                  for li in range(len(selected)))
    save_file(ref, os.path.join(d, "reference.safetensors"))
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": seed,
            "tokens_with_changed_routing_after_perturbation": changed,
            "total_token_layers": int(ids.numel() * len(selected)),
            "bf16_weights": bf16_weights, "sharded": bool(shard)}
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"), indent=1)
    mf.make_grads(d, seed)  # grads.safetensors: the training reference
    print(name, sorted(os.listdir(d)), meta)
    tar = os.path.join(outdir, name + ".tar.gz")
    with tarfile.open(tar, "w:gz") as t:
        t.add(d, arcname=name)


if __name__ == "__main__":
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    # Qwen3: 5 layers, layers 1 and 3 dense, 16 experts, top-4, no renorm, tied embeddings, MQA.
    make("qwen3_moe_dense_gaps", Qwen3MoeConfig, dict(
        vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=1, head_dim=12, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=True, moe_intermediate_size=24,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[1, 3]), 777, out)
    # Qwen2: decoder_sparse_step 2 (layers 1, 3 MoE), 12 experts, top-3, renorm, bf16, sharded.
    make("qwen2_moe_sparse_step_bf16_sharded", Qwen2MoeConfig, dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, num_experts=12, num_experts_per_tok=3,
        norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[]), 999, out,
        bf16_weights=True, shard="150KB")
