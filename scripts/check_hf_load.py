"""Load checkpoints saved by lockstep (after a few training steps) in transformers and compare
transformers' float32 logits with the ones lockstep computed (lockstep_logits.safetensors
beside each checkpoint). Made by `cargo run --release -p lockstep-trainer --example
export_for_hf -- DIR`; run on the GPU machine (transformers 5.17, CPU float32):

    python3 scripts/check_hf_load.py DIR
Exits non-zero if any relative error max|a-b|/max|b| exceeds 1e-4."""
import os, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = sys.argv[1]
worst = 0.0
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    ref = load_file(os.path.join(d, "lockstep_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.float()
    err = (logits - ref["logits"]).abs().max().item() / ref["logits"].abs().max().item()
    worst = max(worst, err)
    print(f"{name:24s} {type(model).__name__:24s} rel err {err:.3e}")
print("worst", worst)
sys.exit(0 if worst <= 1e-4 else 1)
