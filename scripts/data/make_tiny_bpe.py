#!/usr/bin/env python3
"""Make a tiny byte-level BPE tokenizer (stdlib only) for tests of the real tokenizer path.

Trains `--merges` BPE merges on the word-problem training prompts (GPT-2 style: bytes mapped
to printable characters, words split with their leading space), adds the ChatML special tokens
and writes a HF `tokenizers` `tokenizer.json` plus a `tokenizer_config.json` with a ChatML chat
template and `eos_token` = <|im_end|>, into testdata/tasks/tiny-bpe/.

    python3 scripts/data/make_tiny_bpe.py [--merges 96]
"""
import argparse
import collections
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_chars():
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--merges", type=int, default=96)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "testdata", "tasks", "word_problems_train.jsonl"))
    ap.add_argument("--out", default=os.path.join(ROOT, "testdata", "tasks", "tiny-bpe"))
    args = ap.parse_args()
    chars = byte_chars()
    words = collections.Counter()
    with open(args.corpus) as f:
        for line in f:
            r = json.loads(line)
            for w in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", r["prompt"] + r["answer"]):
                words[tuple(chars[b] for b in w.encode())] += 1
    vocab = {chars[b]: b for b in range(256)}
    merges = []
    for _ in range(args.merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(list(best))
        vocab[best[0] + best[1]] = len(vocab)
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    added = [
        {"id": len(vocab) + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for k, s in enumerate(SPECIALS)
    ]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|im_end|>", "chat_template": TEMPLATE}, f, indent=1)
    print(f"{args.out}: {len(vocab)} BPE tokens ({len(merges)} merges) + {len(SPECIALS)} special = {len(vocab) + len(SPECIALS)}")


if __name__ == "__main__":
    main()
