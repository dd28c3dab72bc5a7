#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's view (throughput, occupancy, warp stalls) of kbench's
# shared-memory thin kernels — the grouped one at 512 assignments over 128 experts (gate_up,
# a 64-request decode step) and the dense one at 1 row (q) — in $OUT/ncu_<kernel>.txt.
#   carry: [".gpu-bin/kbench.gz"]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="${OUT:-/tmp/kbench}"; mkdir -p "$OUT"
gunzip -c "$ROOT/.gpu-bin/kbench.gz" > /tmp/kbench && chmod +x /tmp/kbench
NCU="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
# kbench launches each candidate 54 times a case (check, 3 warm-ups, 50 timed): the grouped
# kernel's 110th launch is in its third case (512 assignments), the dense one's 6th in its first
for spec in "nx_grouped_smem_1:110" "nx_dense_smem_1_256:5"; do
  k="${spec%%:*}"; skip="${spec##*:}"
  timeout 150 "$NCU" --kernel-name "$k" --launch-skip "$skip" --launch-count 1 --print-details all \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
    /tmp/kbench > "$OUT/ncu_$k.txt" 2>&1
  echo "== $k (rc $?)"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per|Stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Waves" "$OUT/ncu_$k.txt" | head -40
done
