#!/usr/bin/env python3
"""Generate the shipped arithmetic word-problem set (stdlib only, seeded, deterministic).

Writes testdata/tasks/word_problems_{train,test}.jsonl and the same records as
word_problems_{train,test}.parquet (an uncompressed Parquet file written by parquet_lite.py).
Each record: {"prompt": "...", "answer": "7", "op": "add" | "sub"}. Operands are single digits
(answers 0..18) and the prompts short, so the embedded default model (bytes, hidden 64) learns
the set on a CPU in minutes. Test prompts are (template, numbers) combinations that never occur
in the training file.

    python3 scripts/data/make_word_problems.py [--out testdata/tasks] [--train 2000] [--test 200]
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parquet_lite  # noqa: E402

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
ITEMS = ["pens", "cups", "eggs", "hats", "keys", "maps"]
ADD = [
    "{n} has {a} {i} and gets {b} more. How many {i}?",
    "{n} buys {a} {i}, then {b} {i}. How many {i}?",
]
SUB = [
    "{n} has {a} {i} and gives away {b}. How many {i}?",
    "{n} had {a} {i} and lost {b}. How many {i}?",
]


def problems():
    out = []
    for t, tpl in enumerate(ADD + SUB):
        sub = t >= len(ADD)
        for a in range(10):
            for b in range(10):
                if sub and b > a:
                    continue
                out.append((tpl, a, b, sub))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "testdata", "tasks"))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    combos = problems()
    rng.shuffle(combos)
    # a fifth of the (template, a, b) combinations are held out
    held = len(combos) // 5
    split = {"test": combos[:held], "train": combos[held:]}
    for name, count in (("train", args.train), ("test", args.test)):
        records = []
        for k in range(count):
            tpl, a, b, sub = split[name][k % len(split[name])] if name == "test" else rng.choice(split[name])
            text = tpl.format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b)
            records.append({"prompt": text + " ", "answer": str(a - b if sub else a + b), "op": "sub" if sub else "add"})
        base = os.path.join(args.out, f"word_problems_{name}")
        with open(base + ".jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        parquet_lite.write_strings(base + ".parquet", ["prompt", "answer", "op"], [[r[c] for c in ("prompt", "answer", "op")] for r in records])
        print(f"{base}.jsonl / .parquet: {len(records)} records")


if __name__ == "__main__":
    main()
