"""The official `openai` client against `lockstep serve` on the embedded default, reading the
routes the way a current-vLLM user does.

Run by crates/server/tests/openai_client.rs (which makes the venv: `pip install openai numpy`),
or by hand: `python scripts/clients/openai_client.py http://127.0.0.1:8000/v1`.

Checks completions, chat, streaming (== the whole response for the same seed), n > 1, and
`routed_experts` decoded with `np.load(io.BytesIO(base64.b64decode(s)))` to the shape current
vLLM documents (vllm/entrypoints/openai/completion/protocol.py): `(num_tokens - 1,
num_hidden_layers, num_experts_per_tok)`, uint8 for 8 experts; the embedded default has 4
decoder layers, layer 2 dense (its column zero), top-2 of 8 experts.
"""

import base64
import io
import json
import sys
import urllib.request

import numpy as np
import openai

LAYERS, TOP_K, EXPERTS, DENSE = 4, 2, 8, 2


def extra(obj, key):
    v = getattr(obj, key, None)
    if v is None and obj.model_extra:
        v = obj.model_extra.get(key)
    return v


def routes(s, rows, what):
    assert isinstance(s, str), f"{what}: routed_experts is {type(s)}, expected a base64 string"
    a = np.load(io.BytesIO(base64.b64decode(s)))
    assert a.shape == (rows, LAYERS, TOP_K), f"{what}: shape {a.shape}, expected {(rows, LAYERS, TOP_K)}"
    assert a.dtype == np.uint8, f"{what}: dtype {a.dtype}"
    assert (a[:, DENSE, :] == 0).all(), f"{what}: the dense layer's column is not zero"
    moe = np.delete(a, DENSE, axis=1)
    assert (moe < EXPERTS).all(), f"{what}: expert id out of range"
    # a top-k row never names an expert twice
    assert (moe[:, :, 0] != moe[:, :, 1]).all(), f"{what}: duplicate expert in a row"
    return a


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main(base_url):
    c = openai.OpenAI(base_url=base_url, api_key="unused")

    # completions, n > 1, logprobs
    r = c.completions.create(model="default", prompt="12+34=", max_tokens=6, n=2, seed=7, temperature=1.0, logprobs=2)
    assert len(r.choices) == 2, r
    for ch in r.choices:
        p, t = extra(ch, "prompt_token_ids"), extra(ch, "token_ids")
        assert p == list(b"12+34="), p
        assert len(t) == 6, t
        routes(extra(ch, "routed_experts"), len(p) + len(t) - 1, "completions")
        assert len(ch.logprobs.tokens) == 6 and len(ch.logprobs.top_logprobs[0]) == 2
    assert r.usage.completion_tokens == 12, r.usage

    # rows from routed_experts_prompt_start on (vLLM's request field)
    r2 = c.completions.create(model="default", prompt="12+34=", max_tokens=6, seed=7, temperature=1.0,
                              extra_body={"routed_experts_prompt_start": 2})
    a2 = routes(extra(r2.choices[0], "routed_experts"), 6 + 6 - 1 - 2, "routed_experts_prompt_start")
    a1 = routes(extra(r.choices[0], "routed_experts"), 11, "completions")
    assert (a1[2:] == a2).all(), "the rows from the start are the full response's"

    # streaming equals the whole response for the same seed
    s = c.completions.create(model="default", prompt="12+34=", max_tokens=6, seed=7, temperature=1.0, stream=True)
    text = "".join(ch.choices[0].text for ch in s if ch.choices)
    assert text == r.choices[0].text, (text, r.choices[0].text)

    # chat: prompt_token_ids at the top (vLLM), routes on the choice
    msgs = [{"role": "user", "content": "2+2="}]
    r = c.chat.completions.create(model="default", messages=msgs, max_tokens=5, n=2, seed=3, temperature=1.0)
    assert len(r.choices) == 2
    p = extra(r, "prompt_token_ids")
    assert p and all(isinstance(x, int) for x in p), p
    for ch in r.choices:
        t = extra(ch, "token_ids")
        routes(extra(ch, "routed_experts"), len(p) + len(t) - 1, "chat")
    s = c.chat.completions.create(model="default", messages=msgs, max_tokens=5, seed=3, temperature=1.0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
    one = c.chat.completions.create(model="default", messages=msgs, max_tokens=5, seed=3, temperature=1.0)
    assert text == one.choices[0].message.content, (text, one.choices[0].message.content)

    # unsupported fields are refused, naming the field
    try:
        c.chat.completions.create(model="default", messages=msgs, max_tokens=2, response_format={"type": "json_object"})
        raise AssertionError("response_format was accepted")
    except openai.BadRequestError as e:
        assert "response_format" in str(e), e
    # token-in-token-out: prime-rl's payload, decoded as its consumer does
    # (src/prime_rl/inference/vllm/routed_experts.py: {data, shape, start, dtype})
    root = base_url.rsplit("/v1", 1)[0]
    prompt = list(b"12+34=")
    body = {"token_ids": prompt, "sampling_params": {"max_tokens": 6, "seed": 7, "temperature": 1.0,
            "routed_experts_prompt_start": 2, "routed_experts_format": "prime-rl"}}
    g = post(root + "/inference/v1/generate", body)
    d = g["choices"][0]["routed_experts"]
    a = np.frombuffer(base64.b64decode(d["data"]), dtype=d["dtype"]).reshape(d["shape"])
    assert d["start"] == 2 and a.shape == (6 + 6 - 1 - 2, LAYERS, TOP_K), d
    assert (a == a2).all(), "prime-rl's rows equal vLLM's for the same request"
    # SGLang /generate: int32 [start_len, seqlen - 1)
    sg = post(root + "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 7},
                                   "return_routed_experts": True, "routed_experts_start_len": 2})
    a3 = np.frombuffer(base64.b64decode(sg["meta_info"]["routed_experts"]), dtype=np.int32).reshape(-1, LAYERS, TOP_K)
    assert (a3 == a2).all(), "SGLang's rows equal vLLM's for the same request"
    print("openai client: ok")


if __name__ == "__main__":
    main(sys.argv[1])
