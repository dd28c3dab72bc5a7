#!/usr/bin/env python3
"""Summarise an `ncu --csv --metrics gpu__time_duration.sum` log of a `bench-serve` run
(scripts/cuda/profile_decode.sh): the kernels are split into steps at every Gumbel sampling
launch (one per engine step), and the last complete steps — pure decode when the run generates
a few tokens past its prefill — are summed by kernel name. Prints per-step device time, kernel
count, and the kernels that take it, per layer where the name repeats once per layer.

    python3 scripts/cuda/decode_profile.py decode_profile.csv --layers 4 [--steps 3]
"""
import argparse
import collections
import csv
import re
import sys


def rows(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            ns = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        yield r["Kernel Name"], ns, r.get("Grid Size", ""), r.get("Block Size", "")


def short(name):
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*>", "<>", name)
    return name[:70]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="last complete steps to average")
    ap.add_argument("--step", type=int, help="sum this one step (1-based, e.g. a prefill step) instead")
    a = ap.parse_args()
    ks = list(rows(a.csv))
    if not ks:
        print("no kernels in the log")
        return 1
    cuts = [i for i, (n, *_rest) in enumerate(ks) if "gumbel" in n]
    print(f"{len(ks)} kernels, {len(cuts)} sampling launches (steps)")
    if len(cuts) < 2:
        print("fewer than two steps: nothing to split")
        return 1
    steps = [ks[cuts[i] + 1: cuts[i + 1] + 1] for i in range(len(cuts) - 1)]
    for i, s in enumerate(steps):
        print(f"step {i + 1}: {len(s)} kernels, {sum(ns for _, ns, *_ in s) / 1e6:.3f} ms device")
    last = [steps[a.step - 1]] if a.step else steps[-a.steps:]
    n = len(last)
    tot = sum(ns for s in last for _, ns, *_ in s) / n
    by = collections.defaultdict(lambda: [0.0, 0, set()])
    for s in last:
        for name, ns, grid, block in s:
            e = by[short(name)]
            e[0] += ns / n
            e[1] += 1
            e[2].add(grid)
    print(f"\n{'step ' + str(a.step) if a.step else f'mean of the last {n} steps'}: {tot / 1e6:.3f} ms device, {sum(len(s) for s in last) / n:.0f} kernels"
          f" ({a.layers} layers: per layer ~{tot / 1e6 / a.layers:.3f} ms if the layers dominate)")
    print(f"{'kernel':72s} {'ms/step':>8s} {'share':>6s} {'n/step':>7s}  grids")
    for name, (ns, cnt, grids) in sorted(by.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:72s} {ns / 1e6:8.3f} {100 * ns / tot:5.1f}% {cnt / n:7.1f}  {' '.join(sorted(grids))[:40]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
