#!/usr/bin/env bash
# Build kbench (the decode products' micro-benchmark) with the pip CUDA toolkit that
# scripts/cuda/build.sh installs into .cuda-env; the binary goes to .gpu-bin/kbench.gz.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
C="${LOCKSTEP_CUDA_ENV:-$ROOT/.cuda-env}/lib/python3.11/site-packages/nvidia/cu13"
mkdir -p "$ROOT/.gpu-bin"
"$C/bin/nvcc" -O3 -std=c++17 -arch=sm_90 -lineinfo -I "$ROOT/crates/model/src/gpu" -I "$ROOT/scripts/cuda/kbench" \
  -L "$C/lib" -cudart static -o /tmp/kbench "$ROOT/scripts/cuda/kbench/kbench.cu" "$@"
gzip -c /tmp/kbench > "$ROOT/.gpu-bin/kbench.gz"
ls -la "$ROOT/.gpu-bin/kbench.gz"
