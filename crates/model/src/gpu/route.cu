// Routing kernels for the CUDA path (crates/model/src/gpu/route.rs): token-choice top-k
// (group-limited when asked), expert-choice selection, the checks of a replayed route, and the
// fused router ops of crates/model/src/moe/router/fused.rs (softmax, top-k weights, token map).
// Compiled to PTX by crates/model/build.rs (nvcc --ptx) when the `cuda` feature is on.
//
// Selection semantics are the host code's (moe/router/token_choice.rs, expert_choice.rs):
// floats are ordered by IEEE total order (Rust's f32::total_cmp), larger first, ties to the
// lower index (expert id, or token slot). A candidate is packed into one u64,
// (ordered bits << 32) | (~index), so "best" is simply the largest key and no two keys tie.
//
// Legend: N tokens, E experts, G expert groups, K experts per token, P pools, A assignments.

#include <stdint.h>

typedef uint32_t u32;
typedef unsigned long long u64;

// f32 bits → u32 whose unsigned order is f32::total_cmp's order.
__device__ __forceinline__ u32 ordered(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ u64 pack(float f, u32 i) { return ((u64)ordered(f) << 32) | (u64)(0xffffffffu - i); }
__device__ __forceinline__ u32 index_of(u64 p) { return 0xffffffffu - (u32)(p & 0xffffffffull); }
__device__ __forceinline__ u64 warp_max(u64 v) {
    for (int o = 16; o > 0; o >>= 1) {
        u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// One warp per token: ids_NK[n] = the K best of choice_NE[n] (biased scores), in selection order.
// With G > 1: keep the KG groups with the best group score (sum of the group's two best
// values: 0 + best + second, as the host sums), set every other expert's value to -inf (not 0:
// a 0 outranks every kept expert whose biased score is negative), then pick. pack(-inf, e) is
// still > 0, the "nothing yet" key, so the pick loop needs no change.
// Dynamic shared memory: (blockDim / 32) * (E + 2 G) words. Needs E <= 1024 (checked by the host).
extern "C" __global__ void route_topk(const float* __restrict__ choice_NE, u32 N, u32 E, u32 G, u32 KG, u32 K,
                                      u32* __restrict__ ids_NK) {
    extern __shared__ float smem[];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 n = blockIdx.x * nwarps + warp;
    if (n >= N) return;  // the whole warp leaves together
    float* row = smem + warp * (E + 2 * G);
    float* gscore = row + E;
    u32* gkeep = (u32*)(gscore + G);
    const float* src = choice_NE + (size_t)n * E;
    for (u32 e = lane; e < E; e += 32) row[e] = src[e];
    __syncwarp();
    if (G > 1) {
        const u32 per = E / G;
        for (u32 g = lane; g < G; g += 32) {
            u64 b1 = 0, b2 = 0;
            for (u32 i = 0; i < per; ++i) {
                u64 p = pack(row[g * per + i], i);
                if (p > b1) { b2 = b1; b1 = p; } else if (p > b2) { b2 = p; }
            }
            float s = 0.0f + row[g * per + index_of(b1)];
            if (per >= 2) s = s + row[g * per + index_of(b2)];
            gscore[g] = s;
            gkeep[g] = 0;
        }
        __syncwarp();
        for (u32 r = 0; r < KG; ++r) {
            u64 best = 0;
            for (u32 g = lane; g < G; g += 32)
                if (!gkeep[g]) { u64 p = pack(gscore[g], g); best = p > best ? p : best; }
            best = warp_max(best);
            if (lane == 0) gkeep[index_of(best)] = 1;
            __syncwarp();
        }
        for (u32 e = lane; e < E; e += 32)
            if (!gkeep[e / per]) row[e] = __uint_as_float(0xff800000u);  // -inf
        __syncwarp();
    }
    u32 taken = 0;  // bit j: expert lane + 32 j already selected
    for (u32 k = 0; k < K; ++k) {
        u64 best = 0;
        for (u32 e = lane, j = 0; e < E; e += 32, ++j)
            if (!((taken >> j) & 1u)) { u64 p = pack(row[e], e); best = p > best ? p : best; }
        best = warp_max(best);
        const u32 idx = index_of(best);
        if ((idx & 31) == lane) taken |= 1u << (idx >> 5);
        if (lane == 0) ids_NK[(size_t)n * K + k] = idx;
    }
}

// Expert choice. Block (pool p, expert e): every token of the pool gets its rank among the
// pool's tokens by choice_NE[·, e] (larger first, ties to the lower slot); ranks below the
// pool's capacity C_p are written to out_off[e * P + p] + rank. Pools list slots ascending
// (pool_off [P + 1] into slots). O(size²) comparisons per block through a shared-memory tile.
extern "C" __global__ void route_expert_choice(const float* __restrict__ choice_NE, u32 E, const u32* __restrict__ pool_off,
                                               const u32* __restrict__ slots, const u32* __restrict__ cap_P,
                                               const u32* __restrict__ out_off, u32 P, u32* __restrict__ token_A,
                                               u32* __restrict__ expert_A) {
    __shared__ u64 tile[256];
    const u32 p = blockIdx.x, e = blockIdx.y;
    const u32 lo = pool_off[p], hi = pool_off[p + 1], c = cap_P[p];
    if (c == 0) return;
    const u32 base = out_off[(size_t)e * P + p];
    for (u32 i0 = lo; i0 < hi; i0 += blockDim.x) {
        const u32 i = i0 + threadIdx.x;
        u64 mine = 0;
        u32 slot = 0;
        if (i < hi) { slot = slots[i]; mine = pack(choice_NE[(size_t)slot * E + e], slot); }
        u32 rank = 0;
        for (u32 j0 = lo; j0 < hi; j0 += 256) {
            const u32 j = j0 + threadIdx.x;
            if (threadIdx.x < 256) {
                u64 v = 0;
                if (j < hi) { u32 s = slots[j]; v = pack(choice_NE[(size_t)s * E + e], s); }
                tile[threadIdx.x] = v;
            }
            __syncthreads();
            const u32 m = min(256u, hi - j0);
            for (u32 t = 0; t < m; ++t) rank += tile[t] > mine;
            __syncthreads();
        }
        if (i < hi && rank < c) { token_A[base + rank] = slot; expert_A[base + rank] = e; }
    }
}

// Checks of a forced top-k route ids_NK: bad[0] += rows mixing ROUTE_FREE (0xffffffff) with
// ids, bad[1] += rows with an id >= E, bad[2] += rows naming an expert twice.
extern "C" __global__ void route_check_topk(const u32* __restrict__ ids_NK, u32 N, u32 K, u32 E, u32* __restrict__ bad) {
    for (u32 n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
        const u32* row = ids_NK + (size_t)n * K;
        u32 free = 0, out = 0, dup = 0;
        for (u32 a = 0; a < K; ++a) {
            const u32 x = row[a];
            if (x == 0xffffffffu) { ++free; continue; }
            if (x >= E) ++out;
            for (u32 b = 0; b < a; ++b) dup += row[b] == x;
        }
        if (free != 0 && free != K) atomicAdd(&bad[0], 1u);
        if (free == 0 && out) atomicAdd(&bad[1], 1u);
        if (free == 0 && dup) atomicAdd(&bad[2], 1u);
    }
}

// Checks of forced assignments: bad[0] += tokens >= N, bad[1] += experts >= E, bad[2] += pairs
// given twice (a bitmap of N x E bits, zeroed by the caller).
extern "C" __global__ void route_check_pairs(const u32* __restrict__ token_A, const u32* __restrict__ expert_A, u32 A, u32 N,
                                             u32 E, u32* __restrict__ seen, u32* __restrict__ bad) {
    for (u32 a = blockIdx.x * blockDim.x + threadIdx.x; a < A; a += gridDim.x * blockDim.x) {
        const u32 t = token_A[a], x = expert_A[a];
        if (t >= N) { atomicAdd(&bad[0], 1u); continue; }
        if (x >= E) { atomicAdd(&bad[1], 1u); continue; }
        const size_t bit = (size_t)t * E + x;
        const u32 m = 1u << (bit & 31);
        if (atomicOr(&seen[bit >> 5], m) & m) atomicAdd(&bad[2], 1u);
    }
}

// The fused router ops (moe/router/fused.rs defines them; the CPU code follows the same order).

// Softmax over rows of E f32 values, one warp per row (any E), 4 warps per block. Lane l takes
// the columns l, l + 32, ... in ascending order: m = max (fmaxf: NaN ignored) through the xor
// butterfly; e_i = expf(x_i - m), kept in out, the lane's partial sum from 0 in column order;
// the partials summed by the xor butterfly 16, 8, 4, 2, 1; out_i = e_i / s (IEEE division).
// A row's bits depend on that row alone.
#define SOFTMAX_WARPS 4
extern "C" __global__ void __launch_bounds__(32 * SOFTMAX_WARPS)
    route_softmax_f32(const float* __restrict__ x_RE, u32 R, u32 E, float* __restrict__ out_RE) {
    const u32 row = blockIdx.x * SOFTMAX_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;  // the whole warp leaves together
    const float* xr = x_RE + (size_t)row * E;
    float* o = out_RE + (size_t)row * E;
    float m = __uint_as_float(0xff800000u);  // -inf
    for (u32 i = lane; i < E; i += 32) m = fmaxf(m, xr[i]);
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
    float s = 0.0f;
    for (u32 i = lane; i < E; i += 32) {
        const float e = expf(xr[i] - m);
        o[i] = e;
        s = s + e;
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s = s + __shfl_xor_sync(0xffffffffu, s, d);
    for (u32 i = lane; i < E; i += 32) o[i] = o[i] / s;
}

// Top-k weights, one thread per token n (grid-strided): p_k = scores_NE[n, ids_NK[n, k]] (NaN
// for an id >= E: never read out of bounds; the host checks forced ids before), S = ((0 + p_0) +
// p_1) + ... in k order; w_k = p_k (renorm 0), p_k / S (1) or p_k / (S + eps) (2); then
// w_k * scale when has_scale. out = [2, N, K]: probs_NK, then weights_NK.
extern "C" __global__ void route_topk_weights(const float* __restrict__ scores_NE, const u32* __restrict__ ids_NK, u32 N,
                                              u32 E, u32 K, u32 renorm, float eps, u32 has_scale, float scale,
                                              float* __restrict__ out) {
    const size_t nk = (size_t)N * K;
    for (u32 n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
        const u32* id = ids_NK + (size_t)n * K;
        float* p = out + (size_t)n * K;
        float* w = out + nk + (size_t)n * K;
        float s = 0.0f;
        for (u32 k = 0; k < K; ++k) {
            const u32 x = id[k];
            const float v = x < E ? scores_NE[(size_t)n * E + x] : __uint_as_float(0x7fc00000u);  // NaN
            p[k] = v;
            s = s + v;
        }
        const float den = renorm == 2 ? s + eps : s;
        for (u32 k = 0; k < K; ++k) {
            float v = p[k];
            if (renorm != 0) v = v / den;
            if (has_scale) v = v * scale;
            w[k] = v;
        }
    }
}

// token_A[a] = a / K for a < A (the token of assignment a of a row-major [N, K] ids), grid-strided.
extern "C" __global__ void route_token_map(u32 A, u32 K, u32* __restrict__ token_A) {
    for (u32 a = blockIdx.x * blockDim.x + threadIdx.x; a < A; a += gridDim.x * blockDim.x) token_A[a] = a / K;
}
