// Candidate decode products for the batch-invariant bf16 family (kbench tries them against the
// kernels of crates/model/src/gpu/invariant_mma.cuh; the winner moves there). Every element takes
// the family's chain: one f32 accumulator, mma.m16n8k16 per 16-wide K step ascending from 0, over
// K rounded up to WBK with zeros, rounded once.
#pragma once
#include <type_traits>

// The x-through-shared-memory thin kernels the product selected until thin_l took their
// sizes (session 18): thin_s (dense, <= 16 rows), thin_s3 (q, k, v at <= 16 rows), grouped
// thin_s2 (9-31 rows an expert), kept here for comparison.
// a predicated 4-byte load (0 where `ok` is false) with no branch, volatile like thin_mma so a
// chunk's w loads are all issued before the mmas that follow them (plain loads, or a branch
// around each, let ptxas sink them to their uses: one load in flight)
__device__ __forceinline__ uint32_t thin_ldp(const __nv_bfloat16* p, bool ok) {
    uint32_t v;
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b32 %0, 0;\n @q ld.global.nc.b32 %0, [%1];\n}\n"
        : "=r"(v)
        : "l"(p), "r"((uint32_t)ok));
    return v;
}

// Thin products with x through shared memory (decode, and the experts at decode): the block's
// x rows (<= 16 MT) staged through shared memory KC K-columns at a time (two
// stages, cp.async, rows padded by 8 bf16 so the fragment reads are free of bank conflicts);
// each warp's w fragments for the next chunk loaded into registers while it computes this one.
template <int MT, int NX_KC>
__device__ __forceinline__ void thin_tile_smem(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                             __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t n0,
                                             uint32_t N, uint32_t K) {
    constexpr uint32_t R = 16 * MT, KS = NX_KC / 16, NX_XS = NX_KC + 8;
    __shared__ __align__(16) __nv_bfloat16 xs[2][R][NX_XS];
    const uint32_t tid = threadIdx.x, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const uint32_t n = n0 + gid;
    const bool nok = n < N;
    const __nv_bfloat16* wr = w + (size_t)(nok ? n : 0) * K + 2 * tig;
    const uint32_t ksteps = K / 16, steps = (K + WBK - 1) / WBK * (WBK / 16);
    const uint32_t chunks = (steps + KS - 1) / KS;
    // loader: 16-byte pieces (8 bf16), rows x KC / 8 of them a chunk
    auto load_x = [&](uint32_t ch, uint32_t st) {
        for (uint32_t p = tid; p < R * (NX_KC / 8); p += 128) {
            const uint32_t r = p / (NX_KC / 8), c8 = (p % (NX_KC / 8)) * 8, k = ch * NX_KC + c8;
            const bool ok = r < rows && k < K;  // K % 16 == 0: a piece is all in or all out
            const uint32_t dst = (uint32_t)__cvta_generic_to_shared(&xs[st][r][c8]);
            const __nv_bfloat16* src = ok ? x + (size_t)(m0 + r) * K + k : x;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    uint32_t b[2][KS][2];
    auto load_w = [&](uint32_t ch, uint32_t buf) {
#pragma unroll
        for (uint32_t u = 0; u < KS; u++) {
            const uint32_t s = ch * KS + u;
            const bool in = nok && s < ksteps;
            b[buf][u][0] = thin_ldp(wr + s * 16, in);
            b[buf][u][1] = thin_ldp(wr + s * 16 + 8, in);
        }
    };
    float c[MT][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[t][e] = 0.0f;
    // one chunk with its stage / register buffer fixed at compile time (a runtime index would
    // put b in local memory)
    auto chunk = [&](uint32_t ch, auto stc) {
        constexpr uint32_t st = decltype(stc)::value;
        if (ch + 1 < chunks) {
            load_x(ch + 1, st ^ 1);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        if (ch + 1 < chunks) load_w(ch + 1, st ^ 1);
#pragma unroll
        for (uint32_t u = 0; u < KS; u++) {
            if (ch * KS + u < steps) {
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    const uint32_t r0 = t * 16 + gid, kc = u * 16 + 2 * tig;
                    const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(&xs[st][r0][kc]),
                                           *reinterpret_cast<const uint32_t*>(&xs[st][r0 + 8][kc]),
                                           *reinterpret_cast<const uint32_t*>(&xs[st][r0][kc + 8]),
                                           *reinterpret_cast<const uint32_t*>(&xs[st][r0 + 8][kc + 8])};
                    thin_mma(c[t], a, b[st][u]);
                }
            }
        }
        __syncthreads();  // stage st is reloaded at chunk ch + 2
    };
    load_x(0, 0);
    load_w(0, 0);
    for (uint32_t ch = 0; ch < chunks; ch += 2) {
        chunk(ch, std::integral_constant<uint32_t, 0>{});
        if (ch + 1 < chunks) chunk(ch + 1, std::integral_constant<uint32_t, 1>{});
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const uint32_t r = t * 16 + gid + 8 * (e >> 1), col = n0 + 2 * tig + (e & 1);
            if (r < rows && col < N) y[(size_t)(m0 + r) * N + col] = __float2bfloat16(c[t][e]);
        }
}
// Measured on an H200 (scripts/cuda/kbench, weights read from HBM): the dense thin kernel above
// took 33-80 us for the 1-8 MB q / k / v / o products at 1-16 rows (its x loads wait one by one
// in the mma chain); this one 12.6-23.8 us, the same bits. Needs K % 16 == 0, x rows 16-byte
// aligned (K % 8, start offset % 8) and w 4-byte aligned (the host checks).
extern "C" __global__ void __launch_bounds__(128) nx_prev_thin_s(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
    uint32_t M, uint32_t N, uint32_t K) {
    const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8, m0 = blockIdx.y * 16;
    if (m0 >= M) return;  // block-uniform: the block's warps share the x stages
    thin_tile_smem<1, 256>(x, w, y, m0, min(M - m0, 16u), n0, N, K);
}
// Three products of one x in one launch (the engine's q, k and v projections): the column blocks
// of w0, then w1, then w2 (ceil(Ni / 32) each), y the three outputs back to back ([M, N0] then
// [M, N1], [M, N2]). Every element is thin_s's (the same chain): kbench, q + k + v of a
// Qwen3-30B-A3B layer at 1 row, 38.9 us in three launches against 18.5 in one.
extern "C" __global__ void __launch_bounds__(128) nx_prev_thin_s3(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w0, const __nv_bfloat16* __restrict__ w1,
    const __nv_bfloat16* __restrict__ w2, __nv_bfloat16* __restrict__ y, uint32_t M, uint32_t N0, uint32_t N1, uint32_t N2,
    uint32_t K) {
    const uint32_t b0 = (N0 + 31) / 32, b1 = (N1 + 31) / 32, m0 = blockIdx.y * 16;
    if (m0 >= M) return;  // block-uniform, as the choice of weight below
    uint32_t bx = blockIdx.x, N = N0;
    const __nv_bfloat16* w = w0;
    __nv_bfloat16* yo = y;
    if (bx >= b0 + b1) {
        bx -= b0 + b1;
        w = w2;
        N = N2;
        yo = y + (size_t)M * (N0 + N1);
    } else if (bx >= b0) {
        bx -= b0;
        w = w1;
        N = N1;
        yo = y + (size_t)M * N0;
    }
    const uint32_t n0 = (bx * 4 + (threadIdx.x >> 5)) * 8;
    thin_tile_smem<1, 256>(x, w, yo, m0, min(M - m0, 16u), n0, N, K);
}
// The grouped products the same way: tile table entries (expert, first row, rows <= 16 MT),
// a block per 32 columns of a tile's expert; MT = 2 (32-row tiles) from 9 to 31 rows an expert
// (2048 rows over 128 experts: 643 us with the 16 x 16 kernel -> 405). (MT = 1 gave way to
// thin_l below; kbench keeps it as nx_grouped_smem_1.)
#define THIN_GROUPED_S(MT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) nx_prev_grouped_thin_s##MT(                              \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,  \
        const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {                                             \
        const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2]; \
        const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8;                                            \
        if (rows == 0) return;                                                                                    \
        thin_tile_smem<MT, 128>(x, w + (size_t)e * N * K, y, m0, rows, n0, N, K);                                  \
    }
THIN_GROUPED_S(2)


// thin_mma; the loads below are volatile too, so a group's loads are all issued before its mmas
// (as plain loads ptxas sinks them to their uses to save registers, leaving one load in flight)
__device__ __forceinline__ void nx_mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// a predicated load (0 where `ok` is false), no branch: a branch around each load would cut
// the group into basic blocks that ptxas schedules one by one
__device__ __forceinline__ uint32_t nx_ldp(const __nv_bfloat16* p, bool ok) {
    uint32_t v;
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b32 %0, 0;\n @q ld.global.nc.b32 %0, [%1];\n}\n"
        : "=r"(v)
        : "l"(p), "r"((uint32_t)ok));
    return v;
}

// V1: x and w fragments of U K steps loaded into registers together, then the U mmas
template <int MT, int U>
__device__ __forceinline__ void nx_tile_pf(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
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
    const __nv_bfloat16* xr0[MT];
    const __nv_bfloat16* xr1[MT];
    bool ok0[MT], ok1[MT];
#pragma unroll
    for (int t = 0; t < MT; t++) {
        const uint32_t r0 = t * 16 + gid, r1 = r0 + 8;
        ok0[t] = r0 < rows;
        ok1[t] = r1 < rows;
        xr0[t] = x + (size_t)(m0 + (ok0[t] ? r0 : 0)) * K + 2 * tig;
        xr1[t] = x + (size_t)(m0 + (ok1[t] ? r1 : 0)) * K + 2 * tig;
    }
    const uint32_t ksteps = K / 16, steps = (K + WBK - 1) / WBK * (WBK / 16);
    for (uint32_t s0 = 0; s0 < steps; s0 += U) {
        uint32_t b[U][2], a[U][MT][4];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const uint32_t s = s0 + u;
            const bool in = s < ksteps;
            b[u][0] = nx_ldp(wr + s * 16, in && nok);
            b[u][1] = nx_ldp(wr + s * 16 + 8, in && nok);
#pragma unroll
            for (int t = 0; t < MT; t++) {
                a[u][t][0] = nx_ldp(xr0[t] + s * 16, in && ok0[t]);
                a[u][t][1] = nx_ldp(xr1[t] + s * 16, in && ok1[t]);
                a[u][t][2] = nx_ldp(xr0[t] + s * 16 + 8, in && ok0[t]);
                a[u][t][3] = nx_ldp(xr1[t] + s * 16 + 8, in && ok1[t]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (s0 + u < steps) {
#pragma unroll
                for (int t = 0; t < MT; t++) nx_mma(c[t], a[u][t], b[u]);
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

#define NX_DENSE_PF(MT, U)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) nx_dense_pf_##MT##_##U(                                    \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, \
        uint32_t M, uint32_t N, uint32_t K) {                                                                    \
        const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8, m0 = blockIdx.y * 16 * MT;               \
        if (n0 >= N || m0 >= M) return;                                                                          \
        nx_tile_pf<MT, U>(x, w, y, m0, min(M - m0, 16u * MT), n0, N, K);                                         \
    }
NX_DENSE_PF(1, 8)
NX_DENSE_PF(1, 16)
NX_DENSE_PF(1, 32)
NX_DENSE_PF(2, 8)
NX_DENSE_PF(2, 16)
NX_DENSE_PF(4, 4)
NX_DENSE_PF(4, 8)

#define NX_GROUPED_PF(U)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) nx_grouped_pf_##U(                                          \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,  \
        const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {                                             \
        const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2]; \
        const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8;                                            \
        if (rows == 0 || n0 >= N) return;                                                                         \
        nx_tile_pf<1, U>(x, w + (size_t)e * N * K, y, m0, rows, n0, N, K);                                        \
    }
NX_GROUPED_PF(4)
NX_GROUPED_PF(8)
NX_GROUPED_PF(16)

// V2: the block's x rows (<= 16 MT) staged through shared memory KC K-columns at a time (two
// stages, cp.async, rows padded by 8 bf16 so the fragment reads are free of bank conflicts);
// each warp's w fragments for the next chunk loaded into registers while it computes this one.
template <int MT, int NX_KC>
__device__ __forceinline__ void nx_tile_smem(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                             __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t n0,
                                             uint32_t N, uint32_t K) {
    constexpr uint32_t R = 16 * MT, KS = NX_KC / 16, NX_XS = NX_KC + 8;
    __shared__ __align__(16) __nv_bfloat16 xs[2][R][NX_XS];
    const uint32_t tid = threadIdx.x, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const uint32_t n = n0 + gid;
    const bool nok = n < N;
    const __nv_bfloat16* wr = w + (size_t)(nok ? n : 0) * K + 2 * tig;
    const uint32_t ksteps = K / 16, steps = (K + WBK - 1) / WBK * (WBK / 16);
    const uint32_t chunks = (steps + KS - 1) / KS;
    // loader: 16-byte pieces (8 bf16), rows x KC / 8 of them a chunk
    auto load_x = [&](uint32_t ch, uint32_t st) {
        for (uint32_t p = tid; p < R * (NX_KC / 8); p += 128) {
            const uint32_t r = p / (NX_KC / 8), c8 = (p % (NX_KC / 8)) * 8, k = ch * NX_KC + c8;
            const bool ok = r < rows && k < K;  // K % 16 == 0: a piece is all in or all out
            const uint32_t dst = (uint32_t)__cvta_generic_to_shared(&xs[st][r][c8]);
            const __nv_bfloat16* src = ok ? x + (size_t)(m0 + r) * K + k : x;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    uint32_t b[2][KS][2];
    auto load_w = [&](uint32_t ch, uint32_t buf) {
#pragma unroll
        for (uint32_t u = 0; u < KS; u++) {
            const uint32_t s = ch * KS + u;
            const bool in = nok && s < ksteps;
            b[buf][u][0] = nx_ldp(wr + s * 16, in);
            b[buf][u][1] = nx_ldp(wr + s * 16 + 8, in);
        }
    };
    float c[MT][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[t][e] = 0.0f;
    // one chunk with its stage / register buffer fixed at compile time (a runtime index would
    // put b in local memory)
    auto chunk = [&](uint32_t ch, auto stc) {
        constexpr uint32_t st = decltype(stc)::value;
        if (ch + 1 < chunks) {
            load_x(ch + 1, st ^ 1);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        if (ch + 1 < chunks) load_w(ch + 1, st ^ 1);
#pragma unroll
        for (uint32_t u = 0; u < KS; u++) {
            if (ch * KS + u < steps) {
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    const uint32_t r0 = t * 16 + gid, kc = u * 16 + 2 * tig;
                    const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(&xs[st][r0][kc]),
                                           *reinterpret_cast<const uint32_t*>(&xs[st][r0 + 8][kc]),
                                           *reinterpret_cast<const uint32_t*>(&xs[st][r0][kc + 8]),
                                           *reinterpret_cast<const uint32_t*>(&xs[st][r0 + 8][kc + 8])};
                    nx_mma(c[t], a, b[st][u]);
                }
            }
        }
        __syncthreads();  // stage st is reloaded at chunk ch + 2
    };
    load_x(0, 0);
    load_w(0, 0);
    for (uint32_t ch = 0; ch < chunks; ch += 2) {
        chunk(ch, std::integral_constant<uint32_t, 0>{});
        if (ch + 1 < chunks) chunk(ch + 1, std::integral_constant<uint32_t, 1>{});
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const uint32_t r = t * 16 + gid + 8 * (e >> 1), col = n0 + 2 * tig + (e & 1);
            if (r < rows && col < N) y[(size_t)(m0 + r) * N + col] = __float2bfloat16(c[t][e]);
        }
}
#define NX_DENSE_SMEM(MT, KC)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) nx_dense_smem_##MT##_##KC(                                      \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, \
        uint32_t M, uint32_t N, uint32_t K) {                                                                    \
        const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8, m0 = blockIdx.y * 16 * MT;               \
        if (m0 >= M) return;                                                                                     \
        nx_tile_smem<MT, KC>(x, w, y, m0, min(M - m0, 16u * MT), n0, N, K);                                      \
    }
NX_DENSE_SMEM(1, 128)
NX_DENSE_SMEM(1, 256)
NX_DENSE_SMEM(2, 128)
NX_DENSE_SMEM(4, 128)
NX_DENSE_SMEM(4, 64)
NX_DENSE_SMEM(8, 64)
#define NX_GROUPED_SMEM(MT)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) nx_grouped_smem_##MT(                                          \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,  \
        const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {                                             \
        const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2]; \
        const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8;                                            \
        if (rows == 0) return;                                                                                    \
        nx_tile_smem<MT, 128>(x, w + (size_t)e * N * K, y, m0, rows, n0, N, K);                                   \
    }
NX_GROUPED_SMEM(1)
NX_GROUPED_SMEM(2)

// The product's shared-memory thin tile (invariant_mma.cuh thin_tile_smem) for the grouped
// products at other chunk widths: KC K columns staged a chunk (the product takes 128).
#define NX_GROUPED_SKC(MT, KC)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) nx_grouped_s##MT##_##KC(                                     \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,  \
        const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {                                             \
        const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2]; \
        const uint32_t n0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 8;                                            \
        if (rows == 0) return;                                                                                    \
        thin_tile_smem<MT, KC>(x, w + (size_t)e * N * K, y, m0, rows, n0, N, K);                                   \
    }
NX_GROUPED_SKC(1, 64)
NX_GROUPED_SKC(1, 256)
NX_GROUPED_SKC(2, 256)


// thin_l's tile over MT m-tiles (16 MT rows a block): every warp's 8 columns times all the
// block's rows, so a weight chunk staged once serves MT mmas (the 16-row tile re-reads the
// weights once per 16 rows, from L2). KC = 64 keeps three stages in static shared memory.
template <int KC, int MT>
__device__ __forceinline__ void nx_tile_ldm_mt(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                               __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t nb,
                                               uint32_t N, uint32_t K) {
    constexpr uint32_t XS = KC + 8, KS = KC / 16, PIECES = KC / 8, R = 16 * MT;
    static_assert(KS % 2 == 0, "w fragments come two K steps at a time");
    __shared__ __align__(16) __nv_bfloat16 xs[3][R][XS];
    __shared__ __align__(16) __nv_bfloat16 wsm[3][32][XS];
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const uint32_t steps = (K + WBK - 1) / WBK * (WBK / 16), chunks = (steps + KS - 1) / KS;
    auto issue = [&](uint32_t ch) {
        if (ch < chunks) {
            const uint32_t st = ch % 3;
            for (uint32_t p = tid; p < R * PIECES; p += 128) {
                const uint32_t r = p / PIECES, c8 = (p % PIECES) * 8, k = ch * KC + c8;
                const bool ok = r < rows && k < K;
                tc_cp16((uint32_t)__cvta_generic_to_shared(&xs[st][r][c8]), ok ? x + (size_t)(m0 + r) * K + k : x, ok);
            }
            for (uint32_t p = tid; p < 32 * PIECES; p += 128) {
                const uint32_t r = p / PIECES, c8 = (p % PIECES) * 8, k = ch * KC + c8;
                const bool ok = nb + r < N && k < K;
                tc_cp16((uint32_t)__cvta_generic_to_shared(&wsm[st][r][c8]), ok ? w + (size_t)(nb + r) * K + k : w, ok);
            }
        }
        tc_commit();
    };
    float c[MT][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[t][e] = 0.0f;
    const uint32_t mts = (rows + 15) / 16;
    issue(0);
    issue(1);
    for (uint32_t ch = 0; ch < chunks; ch++) {
        tc_wait<1>();
        __syncthreads();
        issue(ch + 2);
        const uint32_t st = ch % 3;
#pragma unroll
        for (uint32_t u = 0; u < KS; u += 2) {
            uint32_t b[4];
            tc_ldsm4(b, (uint32_t)__cvta_generic_to_shared(&wsm[st][warp * 8 + (lane & 7)][u * 16 + 8 * (lane >> 3)]));
#pragma unroll
            for (uint32_t h = 0; h < 2; h++) {
                if (ch * KS + u + h < steps) {
#pragma unroll
                    for (int t = 0; t < MT; t++) {
                        if (t < mts) {
                            uint32_t a[4];
                            tc_ldsm4(a, (uint32_t)__cvta_generic_to_shared(&xs[st][t * 16 + (lane & 15)][(u + h) * 16 + 8 * (lane >> 4)]));
                            thin_mma(c[t], a, b + 2 * h);
                        }
                    }
                }
            }
        }
    }
    const uint32_t n0 = nb + warp * 8;
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const uint32_t r = t * 16 + gid + 8 * (e >> 1), col = n0 + 2 * tig + (e & 1);
            if (r < rows && col < N) y[(size_t)(m0 + r) * N + col] = __float2bfloat16(c[t][e]);
        }
}
#define NX_DENSE_LDM_MT(KC, MT)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) nx_dense_ldm_##KC##_##MT(                                  \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, \
        uint32_t M, uint32_t N, uint32_t K) {                                                                    \
        const uint32_t m0 = blockIdx.y * 16 * MT;                                                               \
        if (m0 >= M) return;                                                                                     \
        nx_tile_ldm_mt<KC, MT>(x, w, y, m0, min(M - m0, 16u * MT), blockIdx.x * 32, N, K);                       \
    }
NX_DENSE_LDM_MT(128, 1)
NX_DENSE_LDM_MT(64, 1)
NX_DENSE_LDM_MT(64, 2)
NX_DENSE_LDM_MT(64, 4)

