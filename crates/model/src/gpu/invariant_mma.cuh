// The mma-based batch-invariant bf16 products (included by invariant.cu, one PTX module with it):
// the thin kernels for decode and the pipelined tensor-core kernels for training / prefill.
// Uses invariant.cu's WBK; every element takes the chain its kernels document.
#pragma once
#include <type_traits>

// Thin products (few rows: decode), bf16: a warp per 8 output columns and every 16-row m-tile
// of its rows (MT of them), the weights streamed straight from global memory (8 K steps of
// loads in flight), 4 warps a block — many warps, so the weight read runs at memory speed. Per
// element the same chain as every bf16 kernel above: mma over 16-wide K steps ascending from 0
// (mma.m16n8k16 is the instruction a 16 x 16 x 16 wmma issues per 8 columns), over K rounded
// up to WBK with zeros, one f32 accumulator, rounded once — so the same bits as the others.
// Needs K % 16 == 0 and 4-byte aligned rows (the host checks).
#define THIN_WARPS 4
// K steps of weight loads in flight per warp: the grouped kernel (thousands of warps) 8; the
// dense one (as few as N / 8 warps: 64 for a 512-wide k / v projection) 16
#define THIN_UNROLL_GROUPED 8
#define THIN_UNROLL_DENSE 16
// one m-tile (decode at one to 16 requests): 32 K steps (8 KiB of weights a warp) in flight
#define THIN_UNROLL_DENSE1 32
__device__ __forceinline__ void thin_mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t thin_ld(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// y[m0 + r, n0 + j] = Σ_k x[m0 + r, k] w[n0 + j, k] for r < rows (<= 16 MT), j < 8
template <int MT, int THIN_UNROLL>
__device__ __forceinline__ void thin_tile(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                          __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t n0,
                                          uint32_t N, uint32_t K) {
    const uint32_t lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const uint32_t n = n0 + gid;
    const bool nok = n < N;
    const __nv_bfloat16* wr = w + (size_t)(nok ? n : 0) * K + 2 * tig;
    float c[MT][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[t][e] = 0.0f;
    const uint32_t ksteps = K / 16, steps = (K + WBK - 1) / WBK * (WBK / 16);
    for (uint32_t s0 = 0; s0 < steps; s0 += THIN_UNROLL) {
        uint32_t b[THIN_UNROLL][2];
#pragma unroll
        for (int u = 0; u < THIN_UNROLL; u++) {
            const uint32_t s = s0 + u;
            const bool in = nok && s < ksteps;
            b[u][0] = in ? thin_ld(wr + s * 16) : 0u;
            b[u][1] = in ? thin_ld(wr + s * 16 + 8) : 0u;
        }
#pragma unroll
        for (int u = 0; u < THIN_UNROLL; u++) {
            const uint32_t s = s0 + u;
            if (s >= steps) break;
            const bool kin = s < ksteps;
#pragma unroll
            for (int t = 0; t < MT; t++) {
                const uint32_t r0 = t * 16 + gid, r1 = r0 + 8;
                const bool ok0 = kin && r0 < rows, ok1 = kin && r1 < rows;
                const __nv_bfloat16* x0 = x + (size_t)(m0 + (ok0 ? r0 : 0)) * K + s * 16 + 2 * tig;
                const __nv_bfloat16* x1 = x + (size_t)(m0 + (ok1 ? r1 : 0)) * K + s * 16 + 2 * tig;
                const uint32_t a[4] = {ok0 ? thin_ld(x0) : 0u, ok1 ? thin_ld(x1) : 0u, ok0 ? thin_ld(x0 + 8) : 0u,
                                       ok1 ? thin_ld(x1 + 8) : 0u};
                thin_mma(c[t], a, b[u]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const uint32_t r = t * 16 + gid + 8 * (e >> 1), col = n0 + 2 * tig + (e & 1);
            if (r < rows && col < N) y[(size_t)(m0 + r) * N + col] = __float2bfloat16(c[t][e]);
        }
}

#define THIN_DENSE(MT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * THIN_WARPS) inv_matmul_nt_bf16_thin##MT(                  \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, \
        uint32_t M, uint32_t N, uint32_t K) {                                                                   \
        const uint32_t n0 = (blockIdx.x * THIN_WARPS + (threadIdx.x >> 5)) * 8, m0 = blockIdx.y * 16 * MT;      \
        if (n0 >= N || m0 >= M) return;                                                                         \
        thin_tile<MT, MT == 1 ? THIN_UNROLL_DENSE1 : THIN_UNROLL_DENSE>(x, w, y, m0, min(M - m0, 16u * MT), n0, N, K); \
    }
// one to four 16-row m-tiles a warp (M <= 16, 32, 48, 64 a block row; more rows: more block rows,
// each streaming the weights again)
THIN_DENSE(1)
THIN_DENSE(2)
THIN_DENSE(3)
THIN_DENSE(4)

// The grouped product's thin variant: tile table entries (expert, first row, rows <= 16) as for
// inv_grouped_nt_bf16, a warp per 8 columns of the expert's weights.
extern "C" __global__ void __launch_bounds__(32 * THIN_WARPS) inv_grouped_nt_bf16_thin(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
    const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    const uint32_t n0 = (blockIdx.x * THIN_WARPS + (threadIdx.x >> 5)) * 8;
    if (rows == 0 || n0 >= N) return;
    thin_tile<1, THIN_UNROLL_GROUPED>(x, w + (size_t)e * N * K, y, m0, rows, n0, N, K);
}


// The tensor-core products at training / prefill sizes: a 128 x 128 output tile a block (4 warps
// of 64 x 64), K staged 32 at a time through a 4-stage cp.async pipeline in shared memory
// (16-byte chunks XOR-swizzled so the ldmatrix reads are free of bank conflicts), operands read
// by ldmatrix.x4 (x rows give the row-major A fragment, w rows — K contiguous — the col-major B
// fragment), mma.m16n8k16 with f32 accumulators, bf16 stored straight from the registers.
// Per element the same chain as every bf16 kernel above: the accumulator starts at 0, one mma
// (thin_mma, the very instruction) per 16-wide K step ascending from k = 0, over K rounded up to
// WBK = 32 with zeros (ceil(K / 32) * 2 steps; cp.async's zero fill writes the k >= K chunks and
// the rows / columns out of range), rounded once (__float2bfloat16). The pipeline, the warp
// layout and the fragment loads only decide when and where the operands arrive, never which
// mma a product goes into, so the bits equal the 64 x 64, 16 x 16 and thin kernels'.
// Needs K % 8 == 0 and 16-byte aligned x and w (every row then starts on a 16-byte boundary;
// the host checks K and the start offsets, allocations being 256-byte aligned). Dynamic shared
// memory of TC_SMEM bytes (64 KiB: the host raises the function's limit); 236 registers, so two
// blocks an SM. (Measured on an H200: M4096 N2048 K2048 ~400 TFLOP/s; TC_BK = 64 — the code
// allows it, skipping the K steps past 2 ceil(K / 32) — and 8-warp 128 x 256 / 256 x 128 tiles
// or 3 / 5 stages were slower or no faster.)
#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 4
#define TC_WARPS_M 2
#define TC_WARPS_N 2
#define TC_THREADS (32 * TC_WARPS_M * TC_WARPS_N)
#define TC_A_BYTES (TC_BM * TC_BK * 2)
#define TC_B_BYTES (TC_BN * TC_BK * 2)
#define TC_STAGE_BYTES (TC_A_BYTES + TC_B_BYTES)
#define TC_SMEM (TC_STAGES * TC_STAGE_BYTES)

__device__ __forceinline__ void tc_cp16(uint32_t dst, const void* src, bool valid) {
    // src-size 0: no bytes read, the 16 destination bytes zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void tc_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void tc_ldsm4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The swizzled chunk of 16-byte chunk c in smem row r (rows of TC_BK bf16 = TC_BK / 8 chunks):
// the 8 consecutive rows one ldmatrix phase reads, or one loader pass writes, land in 8 distinct
// 16-byte bank groups (rows of 64 bytes: two rows a 128-byte bank line; of 128 bytes: one).
__device__ __forceinline__ uint32_t tc_swz(uint32_t r, uint32_t c) {
    return TC_BK == 32 ? c ^ ((r >> 1) & 3) : c ^ (r & 7);
}

// y[m0 + r, n] = Σ_k x[m0 + r, k] w[n, k] for r < rows (<= TC_BM) and column tile bx's TC_BN
// columns n < N
__device__ __forceinline__ void tc_tile(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                        __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t N,
                                        uint32_t K, uint32_t bx) {
    constexpr uint32_t WM = TC_BM / TC_WARPS_M, WN = TC_BN / TC_WARPS_N, MI = WM / 16, NI = WN / 8;
    constexpr uint32_t CH = TC_BK / 8, ROW_BYTES = TC_BK * 2, KK = TC_BK / 16;  // chunks a row, K steps a stage
    constexpr uint32_t ROW_STEP = TC_THREADS / CH;  // rows of a tile one pass of the loader covers
    constexpr uint32_t A_ITERS = TC_BM / ROW_STEP, B_ITERS = TC_BN / ROW_STEP;
    static_assert(TC_BK == 32 || TC_BK == 64, "a stage holds 2 or 4 K steps");
    static_assert(WM % 16 == 0 && WN % 16 == 0 && TC_BM % ROW_STEP == 0 && TC_BN % ROW_STEP == 0, "tile shape");
    static_assert(ROW_STEP % 8 == 0, "the swizzle of a loader row must not depend on its pass");
    extern __shared__ __align__(128) uint8_t tc_smem[];
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t n0 = bx * TC_BN;
    const uint32_t wm = (warp / TC_WARPS_N) * WM, wn = (warp % TC_WARPS_N) * WN;
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(tc_smem);
    // a stage: A [TC_BM][TC_BK] then B [TC_BN][TC_BK] bf16, chunks swizzled by tc_swz

    // loader: thread tid copies chunk (tid % CH) of rows tid / CH + ROW_STEP i of A and of B
    const uint32_t lrow = tid / CH, lch = tid % CH;
    const uint32_t soff = lrow * ROW_BYTES + (tc_swz(lrow, lch) << 4);
    const __nv_bfloat16* xa = x + (size_t)(m0 + lrow) * K + lch * 8;
    const __nv_bfloat16* wb = w + (size_t)(n0 + lrow) * K + lch * 8;
    const size_t pass = (size_t)ROW_STEP * K;
    auto load = [&](uint32_t kt, uint32_t st) {
        const uint32_t k = kt * TC_BK;
        const bool kok = k + lch * 8 < K;  // K % 8 == 0: a chunk is all in or all out
        const uint32_t sa = sbase + st * TC_STAGE_BYTES + soff, sb = sa + TC_A_BYTES;
#pragma unroll
        for (uint32_t i = 0; i < A_ITERS; i++) {
            const bool ok = kok && lrow + ROW_STEP * i < rows;
            tc_cp16(sa + i * ROW_STEP * ROW_BYTES, ok ? xa + i * pass + k : x, ok);
        }
#pragma unroll
        for (uint32_t i = 0; i < B_ITERS; i++) {
            const bool ok = kok && n0 + lrow + ROW_STEP * i < N;
            tc_cp16(sb + i * ROW_STEP * ROW_BYTES, ok ? wb + i * pass + k : w, ok);
        }
    };

    // ldmatrix lane addresses (byte offsets in a stage) for the KK 16-wide K steps of a stage.
    // A (m16 x k16 per x4): lane l gives row (l & 15), k chunk (l >> 4) -> a0..a3 of mma.m16n8k16.
    // B (two n8 x k16 per x4): lane l gives n row (l & 7) + 8 (l >> 4), k chunk (l >> 3) & 1 ->
    // {b0, b1} of the first n8 tile, then of the second. Rows start at multiples of 16 (wm, wn,
    // 16 mi, 16 p), so the swizzle of a lane's row depends on (l & 7) only.
    uint32_t aoff[KK], boff[KK];
#pragma unroll
    for (uint32_t kk = 0; kk < KK; kk++) {
        const uint32_t ar = lane & 15, br = (lane & 7) + ((lane >> 4) << 3);
        aoff[kk] = (wm + ar) * ROW_BYTES + (tc_swz(ar, 2 * kk + (lane >> 4)) << 4);
        boff[kk] = TC_A_BYTES + (wn + br) * ROW_BYTES + (tc_swz(br, 2 * kk + ((lane >> 3) & 1)) << 4);
    }
    uint32_t af[2][MI][4], bfr[2][NI][2];
    auto frags = [&](uint32_t buf, uint32_t st, uint32_t kk) {
        const uint32_t base = sbase + st * TC_STAGE_BYTES;
#pragma unroll
        for (uint32_t mi = 0; mi < MI; mi++) tc_ldsm4(af[buf][mi], base + aoff[kk] + mi * 16 * ROW_BYTES);
#pragma unroll
        for (uint32_t p = 0; p < NI / 2; p++) {
            uint32_t r[4];
            tc_ldsm4(r, base + boff[kk] + p * 16 * ROW_BYTES);
            bfr[buf][2 * p][0] = r[0];
            bfr[buf][2 * p][1] = r[1];
            bfr[buf][2 * p + 1][0] = r[2];
            bfr[buf][2 * p + 1][1] = r[3];
        }
    };
    float acc[MI][NI][4];
#pragma unroll
    for (uint32_t mi = 0; mi < MI; mi++)
#pragma unroll
        for (uint32_t ni = 0; ni < NI; ni++)
#pragma unroll
            for (uint32_t e = 0; e < 4; e++) acc[mi][ni][e] = 0.0f;
    auto mmas = [&](uint32_t buf) {
#pragma unroll
        for (uint32_t mi = 0; mi < MI; mi++)
#pragma unroll
            for (uint32_t ni = 0; ni < NI; ni++) thin_mma(acc[mi][ni], af[buf][mi], bfr[buf][ni]);
    };

    // tile kt of K lives in stage kt % TC_STAGES. Before the body of iteration kt, tiles up to kt
    // have landed (wait + barrier); it issues tile kt + STAGES - 1 into the stage every warp
    // finished reading before the previous barrier, and reads stage kt: each K step's fragments
    // are loaded during the step before (the first of the next stage after the next barrier).
    // One commit per tile slot (empty groups past the end) keeps wait_group exact. The K steps:
    // 2 ceil(K / 32) of them, s = KK kt + kk; with TC_BK = 64 the last tile's upper half is
    // skipped when it lies wholly past that count (it would add steps the other kernels lack).
    const uint32_t ktiles = (K + TC_BK - 1) / TC_BK, steps = (K + WBK - 1) / WBK * (WBK / 16);
#pragma unroll
    for (uint32_t s = 0; s < TC_STAGES - 1; s++) {
        if (s < ktiles) load(s, s);
        tc_commit();
    }
    tc_wait<TC_STAGES - 2>();
    __syncthreads();
    frags(0, 0, 0);
    uint32_t rs = 0, ws = TC_STAGES - 1;
    for (uint32_t kt = 0; kt < ktiles; kt++) {
#pragma unroll
        for (uint32_t kk = 0; kk < KK; kk++) {
            if (kk + 1 < KK) {
                frags((kk + 1) & 1, rs, kk + 1);
            } else {
                tc_wait<TC_STAGES - 2>();
                __syncthreads();
                rs = rs + 1 == TC_STAGES ? 0 : rs + 1;
                frags((kk + 1) & 1, rs, 0);  // (past the last tile: a stale stage, never used)
            }
            if (kk == 0) {
                if (kt + TC_STAGES - 1 < ktiles) load(kt + TC_STAGES - 1, ws);
                tc_commit();
                ws = ws + 1 == TC_STAGES ? 0 : ws + 1;
            }
            if (KK == 2 || kt * KK + kk < steps) mmas(kk & 1);  // K step KK kt + kk
        }
    }

    // epilogue: c0, c1 at (row gid, columns 2 tig, 2 tig + 1), c2, c3 at row gid + 8
    const uint32_t gid = lane >> 2, tig = lane & 3;
    const bool pairs = (N & 1) == 0;  // then an even column's pair is 4-byte aligned in y
#pragma unroll
    for (uint32_t mi = 0; mi < MI; mi++)
#pragma unroll
        for (uint32_t h = 0; h < 2; h++) {
            const uint32_t r = wm + mi * 16 + gid + 8 * h;
            if (r >= rows) continue;
            __nv_bfloat16* yr = y + (size_t)(m0 + r) * N;
#pragma unroll
            for (uint32_t ni = 0; ni < NI; ni++) {
                const uint32_t col = n0 + wn + ni * 8 + 2 * tig;
                const __nv_bfloat16 v0 = __float2bfloat16(acc[mi][ni][2 * h]), v1 = __float2bfloat16(acc[mi][ni][2 * h + 1]);
                if (pairs && col + 1 < N) {
                    __nv_bfloat162 v;
                    v.x = v0;
                    v.y = v1;
                    *reinterpret_cast<__nv_bfloat162*>(yr + col) = v;
                } else {
                    if (col < N) yr[col] = v0;
                    if (col + 1 < N) yr[col + 1] = v1;
                }
            }
        }
}

extern "C" __global__ void __launch_bounds__(TC_THREADS) inv_matmul_nt_bf16_tc(const __nv_bfloat16* __restrict__ x,
                                                                                const __nv_bfloat16* __restrict__ w,
                                                                                __nv_bfloat16* __restrict__ y,
                                                                                uint32_t M, uint32_t N, uint32_t K) {
    const uint32_t m0 = blockIdx.y * TC_BM;
    if (m0 >= M) return;
    tc_tile(x, w, y, m0, min(M - m0, (uint32_t)TC_BM), N, K, blockIdx.x);
}

// The three-product kernels' column block bx (of ceil(N0 / cols) + ceil(N1 / cols) + ceil(N2 /
// cols)): its weight, that weight's [M, Ni] part of y (the parts back to back), Ni and the
// block's index within the weight's column blocks.
struct Pick3 {
    const __nv_bfloat16* w;
    __nv_bfloat16* y;
    uint32_t N, bx;
};
__device__ __forceinline__ Pick3 pick3(uint32_t bx, uint32_t cols, const __nv_bfloat16* w0, const __nv_bfloat16* w1,
                                       const __nv_bfloat16* w2, __nv_bfloat16* y, uint32_t M, uint32_t N0, uint32_t N1,
                                       uint32_t N2) {
    const uint32_t b0 = (N0 + cols - 1) / cols, b1 = (N1 + cols - 1) / cols;
    if (bx >= b0 + b1) return {w2, y + (size_t)M * (N0 + N1), N2, bx - b0 - b1};
    if (bx >= b0) return {w1, y + (size_t)M * N0, N1, bx - b0};
    return {w0, y, N0, bx};
}

// Three products of one x in one launch on the same tiles (the engine's q, k, v projections
// beyond 16 rows): the column tiles of w0, then w1, then w2 (ceil(Ni / TC_BN) each), y the three
// [M, Ni] outputs back to back; every element inv_matmul_nt_bf16_tc's.
extern "C" __global__ void __launch_bounds__(TC_THREADS) inv_matmul_nt_bf16_tc3(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w0, const __nv_bfloat16* __restrict__ w1,
    const __nv_bfloat16* __restrict__ w2, __nv_bfloat16* __restrict__ y, uint32_t M, uint32_t N0, uint32_t N1, uint32_t N2,
    uint32_t K) {
    const uint32_t m0 = blockIdx.y * TC_BM;
    if (m0 >= M) return;  // block-uniform, as the choice of weight below
    const Pick3 p = pick3(blockIdx.x, TC_BN, w0, w1, w2, y, M, N0, N1, N2);
    tc_tile(x, p.w, p.y, m0, min(M - m0, (uint32_t)TC_BM), p.N, K, p.bx);
}

// The grouped product on the same tiles: tile table entries (expert, first row, rows <= TC_BM)
// as for inv_grouped_nt_bf16_big, expert e's weights at w + e N K.
extern "C" __global__ void __launch_bounds__(TC_THREADS) inv_grouped_nt_bf16_tc(const __nv_bfloat16* __restrict__ x,
                                                                                 const __nv_bfloat16* __restrict__ w,
                                                                                 __nv_bfloat16* __restrict__ y,
                                                                                 const uint32_t* __restrict__ tiles,
                                                                                 uint32_t N, uint32_t K) {
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    if (rows == 0) return;  // an unused entry of a device-built table (moe_tiles)
    tc_tile(x, w + (size_t)e * N * K, y, m0, min(rows, (uint32_t)TC_BM), N, K, blockIdx.x);
}

// Thin products with both operands through shared memory (decode's grouped experts): a block's
// 16 x rows and 32 w rows staged KC K columns a chunk by 16-byte cp.async in three stages (two
// chunks in flight; rows padded by 8 bf16, so the ldmatrix phases are free of bank conflicts),
// fragments by ldmatrix — x's a0..a3 one x4 a K step, w's b0, b1 of two K steps one x4 — where
// thin_tile_smem loads w by 4-byte loads (8 rows x 16 bytes an instruction, each sector asked
// for twice) and x by 4-byte shared loads: ncu put that kernel at 97% of the L1 pipe and 41% of
// DRAM (gate_up at 512 assignments). Each warp owns 8 of the 32 columns; every element takes
// the family's chain (thin_mma per 16-wide K step ascending from 0 over K rounded up to WBK,
// zero-filled past K). Needs K % 16 == 0 and x and w rows 16-byte aligned (the host checks).
template <int KC>
__device__ __forceinline__ void thin_tile_ldm(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                            __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t nb,
                                            uint32_t N, uint32_t K) {
    constexpr uint32_t XS = KC + 8, KS = KC / 16, PIECES = KC / 8;
    static_assert(KS % 2 == 0, "w fragments come two K steps at a time");
    __shared__ __align__(16) __nv_bfloat16 xs[3][16][XS];
    __shared__ __align__(16) __nv_bfloat16 wsm[3][32][XS];
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const uint32_t steps = (K + WBK - 1) / WBK * (WBK / 16), chunks = (steps + KS - 1) / KS;
    auto issue = [&](uint32_t ch) {
        if (ch < chunks) {
            const uint32_t st = ch % 3;
            for (uint32_t p = tid; p < 16 * PIECES; p += 128) {
                const uint32_t r = p / PIECES, c8 = (p % PIECES) * 8, k = ch * KC + c8;
                const bool ok = r < rows && k < K;  // K % 16 == 0: a piece is all in or all out
                tc_cp16((uint32_t)__cvta_generic_to_shared(&xs[st][r][c8]), ok ? x + (size_t)(m0 + r) * K + k : x, ok);
            }
            for (uint32_t p = tid; p < 32 * PIECES; p += 128) {
                const uint32_t r = p / PIECES, c8 = (p % PIECES) * 8, k = ch * KC + c8;
                const bool ok = nb + r < N && k < K;
                tc_cp16((uint32_t)__cvta_generic_to_shared(&wsm[st][r][c8]), ok ? w + (size_t)(nb + r) * K + k : w, ok);
            }
        }
        tc_commit();  // (empty past the last chunk: one group a chunk slot keeps wait_group exact)
    };
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    issue(0);
    issue(1);
    for (uint32_t ch = 0; ch < chunks; ch++) {
        tc_wait<1>();     // chunk ch has landed (ch + 1 may be in flight)
        __syncthreads();  // ... for every thread; and every warp is done with chunk ch - 1's stage
        issue(ch + 2);    // into that stage
        const uint32_t st = ch % 3;
#pragma unroll
        for (uint32_t u = 0; u < KS; u += 2) {
            uint32_t b[4];
            tc_ldsm4(b, (uint32_t)__cvta_generic_to_shared(&wsm[st][warp * 8 + (lane & 7)][u * 16 + 8 * (lane >> 3)]));
#pragma unroll
            for (uint32_t h = 0; h < 2; h++) {
                if (ch * KS + u + h < steps) {
                    uint32_t a[4];
                    tc_ldsm4(a, (uint32_t)__cvta_generic_to_shared(&xs[st][lane & 15][(u + h) * 16 + 8 * (lane >> 4)]));
                    thin_mma(c, a, b + 2 * h);
                }
            }
        }
    }
    const uint32_t n0 = nb + warp * 8;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const uint32_t r = gid + 8 * (e >> 1), col = n0 + 2 * tig + (e & 1);
        if (r < rows && col < N) y[(size_t)(m0 + r) * N + col] = __float2bfloat16(c[e]);
    }
}
// The dense products on the same tile: a block per 16 rows x 32 columns. Measured on an H200
// (scripts/cuda/kbench, weights from HBM; thin_s = x alone through shared memory, tc = the
// tensor-core kernel below): q of a Qwen3-30B-A3B layer (N 4096, K 2048) at 1 row 13.7 (thin_s)
// -> 12.0 us, at 64 rows 27.0 (tc) -> 22.9; o (N 2048, K 4096) at 64 rows 48.5 -> 27.1; the
// router (N 128) at 64 rows 25.5 -> 10.9; the LM head (N 151936) at 1 row 242 -> 154. The host
// takes it while its grid is at most about one wave (N / 32 x M / 16 blocks x K / 2048 <= 512)
// or up to 8 rows; the same bits as every kernel of the family.
extern "C" __global__ void __launch_bounds__(128) inv_matmul_nt_bf16_thin_l(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
    uint32_t M, uint32_t N, uint32_t K) {
    const uint32_t m0 = blockIdx.y * 16;
    if (m0 >= M) return;  // block-uniform: the block's warps share the stages
    thin_tile_ldm<128>(x, w, y, m0, min(M - m0, 16u), blockIdx.x * 32, N, K);
}
// Three products of one x in one launch (the engine's q, k and v projections): the column blocks
// of w0, then w1, then w2 (ceil(Ni / 32) each), y the three outputs back to back ([M, N0] then
// [M, N1], [M, N2]); every element thin_l's.
extern "C" __global__ void __launch_bounds__(128) inv_matmul_nt_bf16_thin_l3(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w0, const __nv_bfloat16* __restrict__ w1,
    const __nv_bfloat16* __restrict__ w2, __nv_bfloat16* __restrict__ y, uint32_t M, uint32_t N0, uint32_t N1, uint32_t N2,
    uint32_t K) {
    const uint32_t m0 = blockIdx.y * 16;
    if (m0 >= M) return;  // block-uniform, as the choice of weight below
    const Pick3 p = pick3(blockIdx.x, 32, w0, w1, w2, y, M, N0, N1, N2);
    thin_tile_ldm<128>(x, p.w, p.y, m0, min(M - m0, 16u), p.bx * 32, p.N, K);
}
// The grouped products at decode (fewer than 32 rows an expert on average): tile table entries
// (expert, first row, rows <= 16), a block per 32 columns of a tile's expert. kbench, 2048
// assignments over 128 experts (16 an expert): gate_up 406 us (x alone through shared memory,
// 32-row tiles) -> 290, down 208 -> 155.
extern "C" __global__ void __launch_bounds__(128) inv_grouped_nt_bf16_thin_l(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
    const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    if (rows == 0) return;  // an unused entry of a device-built table (moe_tiles)
    thin_tile_ldm<128>(x, w + (size_t)e * N * K, y, m0, rows, blockIdx.x * 32, N, K);
}
