"""Load checkpoints written by lockstep in transformers (5.17, CPU float32) and check them.

    python3 scripts/check_hf_load.py DIR

DIR is one checkpoint (it holds config.json: `lockstep init` output, sharded
model-0000i-of-0000N.safetensors + model.safetensors.index.json or one model.safetensors) or a
folder of checkpoints (each a subfolder, e.g. those `cargo run --release -p lockstep-trainer
--example export_for_hf -- DIR` writes after a few training steps). For every checkpoint:
- transformers loads it with no missing, unexpected or mismatched keys;
- every tensor of the safetensors files whose name transformers keeps in memory as is (all but
  the experts, which transformers 5 fuses) equals the loaded parameter bit for bit;
- the logits of a short forward are finite, and, where lockstep_logits.safetensors lies beside
  the weights, their relative error max|a-b|/max|b| against lockstep's is at most 1e-4.
Exits non-zero if any check fails."""
import json, os, sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def weight_files(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(d, v) for v in json.load(f)["weight_map"].values()})
    return [os.path.join(d, "model.safetensors")]


def check(d):
    with open(os.path.join(d, "config.json")) as f:
        arch = (json.load(f).get("architectures") or ["?"])[0]
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True,
                                                       trust_remote_code=arch.startswith("LLaDA2"))
    model.eval()
    problems = [f"{k}: {info[k]}" for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    state = model.state_dict()
    compared = 0
    for f in weight_files(d):
        for name, t in load_file(f).items():
            if name in state:
                compared += 1
                if not torch.equal(state[name].float(), t.float()):
                    problems.append(f"{name} differs from {os.path.basename(f)}")
    ref_path = os.path.join(d, "lockstep_logits.safetensors")
    if os.path.exists(ref_path):
        ref = load_file(ref_path)
        ids = ref["input_ids"]
    else:
        ref, ids = None, torch.arange(0, 16).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    err = 0.0
    if not torch.isfinite(logits).all():
        problems.append("non-finite logits")
    if ref is not None:
        err = (logits - ref["logits"]).abs().max().item() / ref["logits"].abs().max().item()
        if err > 1e-4:
            problems.append(f"logits rel err {err:.3e} > 1e-4")
    files = len(weight_files(d))
    print(f"{os.path.basename(d.rstrip('/')):32s} {type(model).__name__:24s} {files} file(s), {compared} tensors equal-checked, "
          f"rel err {err:.3e}{'' if ref is not None else ' (no lockstep logits)'}  {'OK' if not problems else 'FAIL: ' + '; '.join(problems)}")
    return not problems


root = sys.argv[1]
dirs = [root] if os.path.exists(os.path.join(root, "config.json")) else \
    [os.path.join(root, n) for n in sorted(os.listdir(root)) if os.path.exists(os.path.join(root, n, "config.json"))]
if not dirs:
    sys.exit(f"{root}: no config.json in it or in its subfolders")
ok = all([check(d) for d in dirs])
sys.exit(0 if ok else 1)
