#!/usr/bin/env bash
# Build the `lockstep` binary with the `cuda` cargo feature on a machine WITHOUT a GPU or a
# system CUDA toolkit, and leave it at .gpu-bin/lockstep for scripts/cuda/gpu_check.sh.
#
#   bash scripts/cuda/build.sh            # idempotent: re-running only redoes what is missing
#
# Environment (all optional):
#   LOCKSTEP_CUDA_ENV   venv holding the pip CUDA toolkit      (default: <repo>/.cuda-env)
#   CARGO_TARGET_DIR    cargo target dir for the CUDA build     (default: <repo>/target-cuda)
#   CUDA_COMPUTE_CAP    SM version the kernels are compiled for (default: 90 = H100/H200)
#   LOCKSTEP_CUDA_JOBS  cargo -j                                (default: cargo's own)
#   LOCKSTEP_CUDA_REV   build this git revision (e.g. HEAD) from a `git archive` snapshot under
#                       $CARGO_TARGET_DIR/snapshot instead of the working tree: use it while
#                       others have half-edited files in the tree (default: the working tree)
#
# A clean build takes ~17 minutes on a 2-core machine (nvcc compiling candle-kernels dominates);
# run it in the background if you need the shell:
#   nohup nice -n 5 bash scripts/cuda/build.sh > /tmp/cuda-build.log 2>&1 &
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 1; }
step() { echo; echo "==> $*"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CUDA_ENV="${LOCKSTEP_CUDA_ENV:-$ROOT/.cuda-env}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
START=$(date +%s)

# The toolkit pins. ALL of them must be pinned to one CUDA minor version: unpinned, pip pulls
# nvvm/crt 13.5, whose PTX the 13.0 ptxas and the GPU machine's CUDA 13.0 driver refuse.
PINS=(
  nvidia-cuda-nvcc==13.0.88    # nvcc + ptxas: candle-kernels compiles its .cu files at build time
  nvidia-nvvm==13.0.88         # cicc / libnvvm, used by nvcc
  nvidia-cuda-crt==13.0.88     # nvcc's crt headers
  nvidia-cuda-runtime==13.0.96 # cuda_runtime.h, libcudart
  nvidia-cuda-cccl==13.0.85    # cub / thrust / libcu++ headers used by the kernels
  nvidia-cublas==13.0.2.14     # libcublas / libcublasLt to link against
  nvidia-curand==10.4.0.35     # libcurand to link against
  nvidia-cuda-nvrtc==13.0.88   # libnvrtc to link against
  nvidia-nccl-cu13==2.28.3     # libnccl to link against (feature nccl); 2.28 = the GPU machines' NCCL
)

# ---------------------------------------------------------------------------------------------
step "0. keep build outputs out of git (per-clone .git/info/exclude, not .gitignore)"
# These folders are large (1.2 GB venv, multi-GB target dir). They must be git-ignored so that
# they neither get committed nor travel with the working tree to the GPU machine; .gpu-bin travels
# only when named in the device call's `carry`.
GIT_DIR="$(git rev-parse --git-common-dir 2>/dev/null)" || die "not inside a git checkout: $ROOT"
mkdir -p "$GIT_DIR/info"
touch "$GIT_DIR/info/exclude"
for p in "$CUDA_ENV" "$CARGO_TARGET_DIR" "$ROOT/.gpu-bin"; do
  case "$p" in "$ROOT"/*) rel="/${p#"$ROOT"/}/" ;; *) continue ;; esac   # outside the repo: nothing to ignore
  grep -qxF "$rel" "$GIT_DIR/info/exclude" || { echo "$rel" >> "$GIT_DIR/info/exclude"; echo "excluded $rel"; }
done

# ---------------------------------------------------------------------------------------------
step "1. CUDA 13.0 toolkit from pip wheels into $CUDA_ENV"
# No nvcc on this machine and no apt CUDA packages: NVIDIA's pip wheels carry nvcc, headers and
# the libraries we link against. A stamp file records the exact pin list so re-runs skip pip.
command -v python3 >/dev/null || die "python3 not found"
STAMP="$CUDA_ENV/.lockstep-pins"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
  echo "already installed (stamp $STAMP matches the pins)"
else
  [[ -x "$CUDA_ENV/bin/python" ]] || python3 -m venv "$CUDA_ENV" || die "python3 -m venv $CUDA_ENV failed"
  "$CUDA_ENV/bin/python" -m pip install --no-input "${PINS[@]}" \
    || die "pip install of the CUDA wheels failed (is the pip mirror reachable? see 'pip config list')"
  echo "${PINS[*]}" > "$STAMP"
fi
SITE="$("$CUDA_ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_HOME="$SITE/nvidia/cu13"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc at $CUDA_HOME/bin/nvcc (wheel layout changed?)"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
# cudarc's build script reads the CUDA version from `nvcc --version` (feature
# cuda-version-from-build-system); make sure it is the 13.0 we pinned.
NVCC_VER="$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
echo "nvcc $NVCC_VER at $(command -v nvcc); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
[[ "$NVCC_VER" == "13.0" ]] || die "nvcc reports CUDA $NVCC_VER, expected 13.0 (a wheel is not pinned?)"

# ---------------------------------------------------------------------------------------------
step "2. link stubs: libcuda.so + unversioned library names"
# candle enables cudarc's `dynamic-linking`: the binary is linked with -lcuda -lnvrtc -lcurand
# -lcublas -lcublasLt. No wheel ships libcuda (it is part of the driver), so we generate a stub
# exporting every cu* driver symbol cudarc declares; its soname is libcuda.so.1 so the binary
# asks for the real driver library at run time. The wheels ship only versioned names
# (libcublas.so.13, ...), so the linker's -lcublas needs unversioned symlinks.
# (Do not switch on cudarc's `dynamic-loading` instead: its build script panics when both are on.)
STUBS="$CUDA_ENV/link-stubs"
mkdir -p "$STUBS"
CUDARC_DIR="$(cargo metadata --format-version 1 --features lockstep-cli/cuda 2>/dev/null \
  | "$CUDA_ENV/bin/python" -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')" \
  || die "could not locate the cudarc crate source (run 'cargo fetch' with network access?)"
DRIVER_RS="$CUDARC_DIR/src/driver/sys/mod.rs"
[[ -f "$DRIVER_RS" ]] || die "cudarc driver bindings not found at $DRIVER_RS"
if [[ ! -f "$STUBS/libcuda.so" || "$DRIVER_RS" -nt "$STUBS/libcuda.so" ]]; then
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$DRIVER_RS" | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' \
    | sort -u > "$STUBS/cuda-symbols.txt"
  n=$(wc -l < "$STUBS/cuda-symbols.txt")
  (( n > 100 )) || die "only $n cu* symbols parsed from $DRIVER_RS (bindings format changed?)"
  { echo "/* generated by scripts/cuda/build.sh from $DRIVER_RS: link-time stub only, never loaded */"
    sed -E 's/.*/int &(void) { return 999; }/' "$STUBS/cuda-symbols.txt"; } > "$STUBS/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/libcuda_stub.c" \
    || die "gcc failed to build the libcuda stub"
  echo "libcuda.so stub: $n symbols from cudarc $(basename "$CUDARC_DIR")"
else
  echo "libcuda.so stub up to date"
fi
for lib in cublas cublasLt curand nvrtc cudart; do
  real="$(ls "$CUDA_HOME"/lib/lib"$lib".so.[0-9]* 2>/dev/null | sort -V | head -1 || true)"
  [[ -n "$real" ]] || die "no $CUDA_HOME/lib/lib$lib.so.N (wheel missing from the pins?)"
  ln -sfn "$real" "$STUBS/lib$lib.so"
  echo "lib$lib.so -> $(basename "$real")"
done
# NCCL (feature nccl) lives in its own wheel folder; the binary asks for libnccl.so.2 at run time
# (the GPU machine's system NCCL, or torch's: see gpu_check.sh).
nccl="$SITE/nvidia/nccl/lib/libnccl.so.2"
[[ -f "$nccl" ]] || die "no $nccl (nvidia-nccl-cu13 missing from the pins?)"
ln -sfn "$nccl" "$STUBS/libnccl.so"
echo "libnccl.so -> $nccl"
# gcc (the linker driver rustc uses) searches LIBRARY_PATH for -l libraries.
export LIBRARY_PATH="$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"

# ---------------------------------------------------------------------------------------------
step "3. cargo build --release -p lockstep-cli --features cuda,nccl (target dir $CARGO_TARGET_DIR)"
# A separate target dir keeps the CPU build (target/) untouched and avoids rebuilding
# candle with/without cuda every time one switches.
JOBS=(); [[ -n "${LOCKSTEP_CUDA_JOBS:-}" ]] && JOBS=(-j "$LOCKSTEP_CUDA_JOBS")
SRC="$ROOT"
BUILT_FROM="working tree at $(git rev-parse --short HEAD) + uncommitted changes"
if [[ -n "${LOCKSTEP_CUDA_REV:-}" ]]; then
  # A committed snapshot: the shared working tree may be mid-edit by someone else.
  REV="$(git rev-parse --verify "${LOCKSTEP_CUDA_REV}^{commit}")" || die "no such revision: $LOCKSTEP_CUDA_REV"
  SRC="$CARGO_TARGET_DIR/snapshot"
  rm -rf "$SRC" && mkdir -p "$SRC"
  # tar -m: give the files the current time, or cargo would take the older commit-time mtimes
  # as "unchanged" and reuse crates compiled from the working tree into the same target dir.
  git archive "$REV" | tar -x -m -C "$SRC" || die "git archive $REV failed"
  BUILT_FROM="commit $REV"
fi
echo "building $BUILT_FROM"
(cd "$SRC" && cargo build --release -p lockstep-cli --features cuda,nccl "${JOBS[@]}") \
  || die "cargo build failed (see above; linker errors naming cu* symbols mean the stub is stale)"

BIN="$CARGO_TARGET_DIR/release/lockstep"
[[ -x "$BIN" ]] || die "cargo succeeded but $BIN is missing"
# the GPU-only tests (crates/cli/tests/gpu_*.rs, `#![cfg(feature = "cuda")]`), run by gpu_check.sh
GPU_TESTS=()
for t in $(cd "$SRC" && ls crates/cli/tests/gpu_*.rs 2>/dev/null); do
  crate="$(basename "$(dirname "$(dirname "$t")")")"; name="$(basename "$t" .rs)"
  # (only crates/cli: the binary's feature set, so candle's CUDA kernels are not built twice)
  exe="$(cd "$SRC" && cargo test --release -p "lockstep-$crate" --features cuda,nccl --test "$name" --no-run --message-format=json "${JOBS[@]}" 2>/dev/null \
    | "$CUDA_ENV/bin/python" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]: print(m["executable"])' | tail -1)"
  [[ -x "$exe" ]] || die "could not build the GPU test $t"
  GPU_TESTS+=("$exe")
done

# ---------------------------------------------------------------------------------------------
step "4. .gpu-bin/lockstep.gz (carried to the GPU machine with carry: [\".gpu-bin\"])"
# A device call may send at most 64 MiB (working tree + carried paths). The binary is ~55 MB,
# mostly candle's embedded PTX text: stripped and gzipped it is ~13 MB. gpu_check.sh unpacks it.
mkdir -p "$ROOT/.gpu-bin"
rm -f "$ROOT/.gpu-bin/lockstep"
TMPBIN="$(mktemp)"
cp -f "$BIN" "$TMPBIN"
strip --strip-unneeded "$TMPBIN" 2>/dev/null || echo "(strip unavailable: packing unstripped)"
gzip -6 -c "$TMPBIN" > "$ROOT/.gpu-bin/lockstep.gz.tmp" && mv -f "$ROOT/.gpu-bin/lockstep.gz.tmp" "$ROOT/.gpu-bin/lockstep.gz"
echo "$BUILT_FROM" > "$ROOT/.gpu-bin/BUILT_FROM"
rm -f "$ROOT"/.gpu-bin/gpu_*.gz
for exe in "${GPU_TESTS[@]}"; do
  name="$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
  cp -f "$exe" "$TMPBIN.t" && strip --strip-unneeded "$TMPBIN.t" 2>/dev/null || true
  gzip -6 -c "$TMPBIN.t" > "$ROOT/.gpu-bin/$name.gz" && rm -f "$TMPBIN.t"
  echo "GPU test $name: .gpu-bin/$name.gz"
done
echo "needs (from the GPU machine's driver / CUDA toolkit):"
readelf -d "$TMPBIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
echo "binary: $BIN ($(stat -c %s "$BIN") bytes; stripped $(stat -c %s "$TMPBIN"))"
rm -f "$TMPBIN"
ls -l "$ROOT/.gpu-bin/"
echo "built from $BUILT_FROM in $(( $(date +%s) - START )) s"
