#!/usr/bin/env python3
"""Sum an `ncu --csv --metrics gpu__time_duration.sum` log by kernel name
(scripts/cuda/profile_stages.sh): device time per run (the log holds `--runs` identical runs of
one stage, e.g. a warm-up and a timed one), kernel count, and the kernels that take the time.

    python3 scripts/cuda/kernel_profile.py profile.csv --runs 2 [--title NAME] [--top 30]
"""
import argparse
import collections
import sys

# the script's own folder is on sys.path when it is run: the decode profile's CSV reader
from decode_profile import rows, short


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--runs", type=int, default=1, help="identical runs in the log (the sums are divided by it)")
    ap.add_argument("--title", default="")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    ks = list(rows(a.csv))
    if not ks:
        print("no kernels in the log")
        return 1
    n = max(a.runs, 1)
    tot = sum(ns for _, ns, *_ in ks) / n
    by = collections.defaultdict(lambda: [0.0, 0, set()])
    for name, ns, grid, _block in ks:
        e = by[short(name)]
        e[0] += ns / n
        e[1] += 1
        e[2].add(grid)
    print(f"{a.title}: {len(ks) / n:.0f} kernels, {tot / 1e6:.3f} ms device per run")
    print(f"{'kernel':72s} {'ms/run':>8s} {'share':>6s} {'n/run':>7s}  grids")
    for name, (ns, cnt, grids) in sorted(by.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"{name:72s} {ns / 1e6:8.3f} {100 * ns / tot:5.1f}% {cnt / n:7.1f}  {' '.join(sorted(grids))[:40]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
