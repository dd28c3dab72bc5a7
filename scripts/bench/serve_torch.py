# The transformers peer of `lockstep bench-serve --random CONFIG`: transformers (5.17) builds the
# model from a config.json with random weights on the GPU (bf16, experts_implementation
# grouped_mm, static cache where it helps), then `generate` at fixed prompt / output lengths
# (ignore_eos: min_new_tokens = max_new_tokens), one JSON line per concurrency.
# usage: python3 serve_torch.py CONFIG.json PROMPT_LEN OUTPUT_LEN C1,C2,.. [--layers N] [--static]
import argparse, json, os, tempfile, time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config"); ap.add_argument("prompt_len", type=int); ap.add_argument("output_len", type=int)
ap.add_argument("concurrency"); ap.add_argument("--layers", type=int); ap.add_argument("--static", action="store_true")
a = ap.parse_args()
with open(a.config) as f:
    raw = json.load(f)
if a.layers:
    raw["num_hidden_layers"] = a.layers
d = tempfile.mkdtemp()
with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(raw, f)
cfg = AutoConfig.from_pretrained(d)
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    try:
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, experts_implementation="grouped_mm"); impl = "grouped_mm"
    except TypeError:
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16); impl = "default"
m.eval()
print(json.dumps({"init_s": round(time.time() - t0, 1), "params_b": round(sum(p.numel() for p in m.parameters()) / 1e9, 2), "impl": impl, "layers": cfg.num_hidden_layers}), flush=True)
g = torch.Generator().manual_seed(0)
extra = {"cache_implementation": "static"} if a.static else {}
for c in [int(x) for x in a.concurrency.split(",")]:
    ids = torch.randint(100, 30000, (c, a.prompt_len), generator=g).cuda()
    att = torch.ones_like(ids)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        m.generate(ids, attention_mask=att, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, **extra)
        torch.cuda.synchronize(); t = time.time()
        m.generate(ids, attention_mask=att, max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False, pad_token_id=0, **extra)
        torch.cuda.synchronize(); dt = time.time() - t
    print(json.dumps({"peer": f"transformers-{impl}", "concurrency": c, "prompt_len": a.prompt_len, "output_len": a.output_len, "wall_s": round(dt, 2),
                      "output_tok_per_s": round(c * a.output_len / dt, 1), "ms_per_step": round(dt / a.output_len * 1000, 2),
                      "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1)}), flush=True)
