#!/usr/bin/env bash
# On the GPU machine: run kbench, write $OUT/kbench.csv.   carry: [".gpu-bin/kbench.gz"]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="${OUT:-/tmp/kbench}"; mkdir -p "$OUT"
gunzip -c "$ROOT/.gpu-bin/kbench.gz" > /tmp/kbench && chmod +x /tmp/kbench
/tmp/kbench | tee "$OUT/kbench.csv"
