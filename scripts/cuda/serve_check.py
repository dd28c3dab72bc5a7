#!/usr/bin/env python3
"""Smoke + batch-invariance check of `lockstep serve` (used by gpu_invariant.sh for --device cuda):
one completion request alone, then the same request among 7 concurrent others (other prompts,
lengths and seeds): its token ids, log-probabilities (as returned, to the last digit) and
routes (the base64 trace) must be identical. Usage: serve_check.py http://127.0.0.1:PORT"""
import json
import sys
import threading
import time
import urllib.request

base = sys.argv[1]


def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


for _ in range(600):
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except Exception:
        time.sleep(0.1)
else:
    sys.exit("server did not come up")

probe = {"prompt": "12+7=", "max_tokens": 12, "temperature": 1.0, "seed": 5, "logprobs": 1, "ignore_eos": True}
alone = post("/v1/completions", probe)["choices"][0]
others = [{"prompt": "9" * (1 + 3 * i) + "+1=", "max_tokens": 4 + 2 * i, "seed": 100 + i, "logprobs": 1} for i in range(7)]
results = {}


def run(i, body):
    results[i] = post("/v1/completions", body)["choices"][0]


threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate([probe] + others)]
for t in threads:
    t.start()
for t in threads:
    t.join()
batched = results[0]
keys = ("token_ids", "routes")
ok = all(alone[k] == batched[k] for k in keys) and alone["logprobs"]["token_logprobs"] == batched["logprobs"]["token_logprobs"]
print(f"alone: {len(alone['token_ids'])} tokens, routes {len(alone['routes'])} base64 chars, logprobs {alone['logprobs']['token_logprobs'][:3]}...")
print(f"alone vs among 7 concurrent requests: token ids, log-probabilities and routes {'identical' if ok else 'DIFFER'}")
sys.exit(0 if ok and alone["routes"] else 1)
