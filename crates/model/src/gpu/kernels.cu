// MoE dispatch / SwiGLU / combine kernels for the CUDA expert path (crates/model/src/gpu).
// Compiled to PTX by crates/model/build.rs (nvcc --ptx) when the `cuda` feature is on.
//
// Legend: N tokens, D hidden, F expert intermediate, E experts, A assignments (token, expert,
// weight), R expert-sorted rows (R = A, or E * padded rows per expert in the padded layout).
// Every reduction runs in a fixed order (no atomics on floats): results are deterministic.

#include <cuda_bf16.h>
#include <stdint.h>

typedef uint32_t u32;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// ---------------------------------------------------------------------------------------------
// Dispatch plan

// counts[k] = #assignments with key k; counts[num_keys] = #keys out of range.
// (Integer atomics: order-free, exact.)
extern "C" __global__ void moe_histogram(const u32* __restrict__ key_A, u32 A, u32* __restrict__ counts, u32 num_keys) {
    for (u32 a = blockIdx.x * blockDim.x + threadIdx.x; a < A; a += gridDim.x * blockDim.x) {
        u32 k = key_A[a];
        atomicAdd(&counts[k < num_keys ? k : num_keys], 1u);
    }
}

// One block per expert (blockDim 1024): a stable rank of each of its assignments, so
// pos_A[a] = row_offset[e] + (#assignments of e before a). Assignment order is kept within an
// expert, like a stable counting sort.
extern "C" __global__ void moe_positions(const u32* __restrict__ expert_A, u32 A, const u32* __restrict__ row_offset,
                                         u32* __restrict__ pos_A) {
    __shared__ u32 warp_tot[32];
    __shared__ u32 running;
    const u32 e = blockIdx.x;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (threadIdx.x == 0) running = 0;
    __syncthreads();
    const u32 base_row = row_offset[e];
    for (u32 base = 0; base < A; base += blockDim.x) {
        u32 a = base + threadIdx.x;
        bool m = a < A && expert_A[a] == e;
        u32 ballot = __ballot_sync(0xffffffffu, m);
        u32 in_warp = __popc(ballot & ((1u << lane) - 1u));
        if (lane == 0) warp_tot[warp] = __popc(ballot);
        __syncthreads();
        u32 before = 0, total = 0;
        for (u32 w = 0; w < nwarps; ++w) {
            u32 t = warp_tot[w];
            if (w < warp) before += t;
            total += t;
        }
        if (m) pos_A[a] = base_row + running + before + in_warp;
        __syncthreads();
        if (threadIdx.x == 0) running += total;
        __syncthreads();
    }
}

// out[0] = 0, out[i + 1] = in[0] + ... + in[i]; one block of 1024 threads.
extern "C" __global__ void moe_exclusive_scan(const u32* __restrict__ in, u32 n, u32* __restrict__ out) {
    __shared__ u32 part[1024];
    const u32 t = threadIdx.x, nt = blockDim.x;
    const u32 chunk = (n + nt - 1) / nt;
    const u32 lo = min(n, t * chunk), hi = min(n, lo + chunk);
    u32 s = 0;
    for (u32 i = lo; i < hi; ++i) s += in[i];
    part[t] = s;
    __syncthreads();
    if (t == 0) {
        u32 acc = 0;
        for (u32 i = 0; i < nt; ++i) { u32 v = part[i]; part[i] = acc; acc += v; }
    }
    __syncthreads();
    u32 acc = part[t];
    if (t == 0) out[0] = 0;
    for (u32 i = lo; i < hi; ++i) { acc += in[i]; out[i + 1] = acc; }
}

// Token CSR: list[toff[n] ..] gets the assignments of token n (any order; sorted afterwards).
// A token id >= N (never planned: the histogram's overflow bin counts it) is skipped.
extern "C" __global__ void moe_token_fill(const u32* __restrict__ token_A, u32 A, u32 N, const u32* __restrict__ toff,
                                          u32* __restrict__ cursor, u32* __restrict__ list) {
    for (u32 a = blockIdx.x * blockDim.x + threadIdx.x; a < A; a += gridDim.x * blockDim.x) {
        u32 n = token_A[a];
        if (n >= N) continue;
        u32 slot = atomicAdd(&cursor[n], 1u);
        list[toff[n] + slot] = a;
    }
}

// Sort each token's (short) assignment list ascending: a fixed summation order.
extern "C" __global__ void moe_token_sort(const u32* __restrict__ toff, u32 N, u32* __restrict__ list) {
    for (u32 n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
        u32 lo = toff[n], hi = toff[n + 1];
        for (u32 i = lo + 1; i < hi; ++i) {
            u32 v = list[i];
            u32 j = i;
            while (j > lo && list[j - 1] > v) { list[j] = list[j - 1]; --j; }
            list[j] = v;
        }
    }
}

// The whole deferred plan of a small batch in one launch (a decode step: A = N * K assignments
// of a few hundred tokens): one block of 1024 threads does what moe_histogram (x2),
// moe_exclusive_scan (x2), moe_positions, moe_token_fill and moe_token_sort do, with the same
// results bit for bit (integers): hist = [expert bins E, overflow, token bins N, overflow],
// pos_A = the stable rank within the expert after its offset (0 for an id >= E), toff = the
// token CSR offsets, list = each token's assignments ascending (0 where a token id >= N left a
// slot unfilled). Dynamic shared memory: the E + N + 2 bins and E + 1 expert offsets, u32.
// The positions cost E * A / 32 ballots over the block's 32 warps: small batches only.
extern "C" __global__ void __launch_bounds__(1024) moe_plan_small(const u32* __restrict__ token_A, const u32* __restrict__ expert_A,
                                                                  u32 A, u32 E, u32 N, u32* __restrict__ hist,
                                                                  u32* __restrict__ pos_A, u32* __restrict__ toff,
                                                                  u32* __restrict__ list) {
    extern __shared__ u32 sh[];
    u32* bins = sh;                 // [E + 1 + N + 1]
    u32* eoff = sh + E + N + 2;     // [E + 1]
    const u32 nb = E + N + 2;
    const u32 t = threadIdx.x, nt = blockDim.x, lane = t & 31, warp = t >> 5, nwarps = nt >> 5;
    for (u32 i = t; i < nb; i += nt) bins[i] = 0;
    for (u32 a = t; a < A; a += nt) { pos_A[a] = 0; list[a] = 0; }
    __syncthreads();
    for (u32 a = t; a < A; a += nt) {
        u32 e = expert_A[a], n = token_A[a];
        atomicAdd(&bins[e < E ? e : E], 1u);
        atomicAdd(&bins[E + 1 + (n < N ? n : N)], 1u);
    }
    __syncthreads();
    for (u32 i = t; i < nb; i += nt) hist[i] = bins[i];
    // the two exclusive scans, one thread each
    if (t == 0) {
        u32 acc = 0;
        for (u32 e = 0; e < E; ++e) { eoff[e] = acc; acc += bins[e]; }
        eoff[E] = acc;
    } else if (t == 32) {
        u32 acc = 0;
        toff[0] = 0;
        for (u32 n = 0; n < N; ++n) { acc += bins[E + 1 + n]; toff[n + 1] = acc; }
    }
    __syncthreads();
    // stable rank within each expert: a warp per expert, the assignments in order, 32 at a time
    for (u32 e = warp; e < E; e += nwarps) {
        u32 running = eoff[e];
        for (u32 base = 0; base < A; base += 32) {
            u32 a = base + lane;
            bool m = a < A && expert_A[a] == e;
            u32 ballot = __ballot_sync(0xffffffffu, m);
            if (m) pos_A[a] = running + __popc(ballot & ((1u << lane) - 1u));
            running += __popc(ballot);
        }
    }
    // token CSR: the token bins become fill cursors, then each token's (short) list is sorted
    u32* cursor = bins + E + 1;
    for (u32 n = t; n < N; n += nt) cursor[n] = 0;
    __syncthreads();
    for (u32 a = t; a < A; a += nt) {
        u32 n = token_A[a];
        if (n < N) list[toff[n] + atomicAdd(&cursor[n], 1u)] = a;
    }
    __syncthreads();
    for (u32 n = t; n < N; n += nt) {
        u32 lo = toff[n], hi = toff[n + 1];
        for (u32 i = lo + 1; i < hi; ++i) {
            u32 v = list[i];
            u32 j = i;
            while (j > lo && list[j - 1] > v) { list[j] = list[j - 1]; --j; }
            list[j] = v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Permute (dispatch) and its backward

// xp[pos[a]] = x[token[a]]   (grid: A blocks; rows not written stay as allocated: zero).
// 16-byte copies when the rows allow it.
template <typename T>
__device__ void permute(const T* __restrict__ x, const u32* __restrict__ token_A, const u32* __restrict__ pos_A, u32 A,
                        u32 D, T* __restrict__ xp) {
    for (u32 a = blockIdx.x; a < A; a += gridDim.x) {
        const T* src = x + (size_t)token_A[a] * D;
        T* dst = xp + (size_t)pos_A[a] * D;
        if (((D * sizeof(T)) % 16 == 0) && ((((uintptr_t)src) | ((uintptr_t)dst)) % 16 == 0)) {
            const uint4* s4 = reinterpret_cast<const uint4*>(src);
            uint4* d4 = reinterpret_cast<uint4*>(dst);
            const u32 n4 = D * sizeof(T) / 16;
            for (u32 i = threadIdx.x; i < n4; i += blockDim.x) d4[i] = s4[i];
        } else {
            for (u32 d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
        }
    }
}

// out[n] = sum over token n's assignments a (ascending) of w[a] * y[pos[a]]  (w null: weight 1):
// acc = fmaf(w[a], y, acc) from 0 in f32, then rounded to T (weight 1: fmaf(1, v, acc) = acc + v).
// A token's rows and weights go to shared memory once (up to GS_MAX assignments; more take the
// loop below, with the same arithmetic), and a column's up to GS_MAX values are all loaded before
// the sum, so a decode step's token costs a few memory round trips rather than three per
// assignment and column block.
#define GS_MAX 16
template <typename T>
__device__ void gather_sum(const T* __restrict__ y, const float* __restrict__ w_A, const u32* __restrict__ toff,
                           const u32* __restrict__ list, const u32* __restrict__ pos_A, u32 N, u32 D, T* __restrict__ out) {
    __shared__ u32 spos[GS_MAX];
    __shared__ float sw[GS_MAX];
    for (u32 n = blockIdx.x; n < N; n += gridDim.x) {
        const u32 lo = toff[n], hi = toff[n + 1], cnt = hi - lo;
        if (cnt <= GS_MAX) {  // block-uniform
            __syncthreads();  // the previous token's readers are done
            if (threadIdx.x < cnt) {
                const u32 a = list[lo + threadIdx.x];
                spos[threadIdx.x] = pos_A[a];
                sw[threadIdx.x] = w_A ? w_A[a] : 1.0f;
            }
            __syncthreads();
            for (u32 d = threadIdx.x; d < D; d += blockDim.x) {
                float v[GS_MAX];
#pragma unroll
                for (u32 j = 0; j < GS_MAX; ++j) v[j] = j < cnt ? to_f(y[(size_t)spos[j] * D + d]) : 0.f;
                float acc = 0.f;
#pragma unroll
                for (u32 j = 0; j < GS_MAX; ++j)
                    if (j < cnt) acc = fmaf(sw[j], v[j], acc);
                out[(size_t)n * D + d] = from_f<T>(acc);
            }
        } else {
            for (u32 d = threadIdx.x; d < D; d += blockDim.x) {
                float acc = 0.f;
                for (u32 j = lo; j < hi; ++j) {
                    const u32 a = list[j];
                    acc = fmaf(w_A ? w_A[a] : 1.0f, to_f(y[(size_t)pos_A[a] * D + d]), acc);
                }
                out[(size_t)n * D + d] = from_f<T>(acc);
            }
        }
    }
}

// Combine backward, one block per assignment: dy[pos[a]] = w[a] * dout[token[a]] (when dy is
// given, with w), dw[a] = <dout[token[a]], y[pos[a]]> (when dw is given, with y).
// blockDim must be a power of two <= 1024.
template <typename T>
__device__ void combine_bwd(const T* __restrict__ dout, const T* __restrict__ y, const float* __restrict__ w_A,
                            const u32* __restrict__ token_A, const u32* __restrict__ pos_A, u32 A, u32 D,
                            T* __restrict__ dy, float* __restrict__ dw_A) {
    __shared__ float red[1024];
    for (u32 a = blockIdx.x; a < A; a += gridDim.x) {
        const T* g = dout + (size_t)token_A[a] * D;
        const size_t row = (size_t)pos_A[a] * D;
        if (dy) {
            const float w = w_A[a];
            for (u32 d = threadIdx.x; d < D; d += blockDim.x) dy[row + d] = from_f<T>(w * to_f(g[d]));
        }
        if (dw_A) {
            float acc = 0.f;
            for (u32 d = threadIdx.x; d < D; d += blockDim.x) acc += to_f(g[d]) * to_f(y[row + d]);
            red[threadIdx.x] = acc;
            __syncthreads();
            for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
                if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
                __syncthreads();
            }
            if (threadIdx.x == 0) dw_A[a] = red[0];
            __syncthreads();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU on the fused gate_up output: gu [R, 2F] (gate columns, then up) → a [R, F].
// grid: (ceil(F / blockDim), rows stride)

// Two adjacent columns per thread (F even: 4-byte bf16 pairs / 8-byte f32 pairs).
template <typename T> struct Pair;
template <> struct Pair<float> { typedef float2 type; };
template <> struct Pair<__nv_bfloat16> { typedef __nv_bfloat162 type; };
__device__ __forceinline__ float2 to_f2(float2 v) { return v; }
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
template <typename P> __device__ __forceinline__ P from_f2(float a, float b);
template <> __device__ __forceinline__ float2 from_f2<float2>(float a, float b) { return make_float2(a, b); }
template <> __device__ __forceinline__ __nv_bfloat162 from_f2<__nv_bfloat162>(float a, float b) { return __floats2bfloat162_rn(a, b); }

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + __expf(-g)); }

template <typename T>
__device__ void swiglu(const T* __restrict__ gu, u32 R, u32 F, T* __restrict__ out) {
    typedef typename Pair<T>::type P;
    const u32 f = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (f >= F) return;
    const bool pair = (F % 2 == 0);
    for (u32 r = blockIdx.y; r < R; r += gridDim.y) {
        const T* row = gu + (size_t)r * 2 * F;
        T* o = out + (size_t)r * F;
        if (pair) {
            float2 g = to_f2(*reinterpret_cast<const P*>(row + f));
            float2 u = to_f2(*reinterpret_cast<const P*>(row + F + f));
            *reinterpret_cast<P*>(o + f) = from_f2<P>(silu_f(g.x) * u.x, silu_f(g.y) * u.y);
        } else {
            for (u32 j = f; j < min(f + 2, F); ++j) o[j] = from_f<T>(silu_f(to_f(row[j])) * to_f(row[F + j]));
        }
    }
}

__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float& dg, float& du) {
    float s = 1.f / (1.f + __expf(-g));
    float silu = g * s;
    dg = d * u * s * (1.f + g * (1.f - s));
    du = d * silu;
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gu, const T* __restrict__ da, u32 R, u32 F, T* __restrict__ dgu) {
    typedef typename Pair<T>::type P;
    const u32 f = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (f >= F) return;
    const bool pair = (F % 2 == 0);
    for (u32 r = blockIdx.y; r < R; r += gridDim.y) {
        const T* row = gu + (size_t)r * 2 * F;
        const T* d = da + (size_t)r * F;
        T* o = dgu + (size_t)r * 2 * F;
        if (pair) {
            float2 g = to_f2(*reinterpret_cast<const P*>(row + f));
            float2 u = to_f2(*reinterpret_cast<const P*>(row + F + f));
            float2 dd = to_f2(*reinterpret_cast<const P*>(d + f));
            float dg0, du0, dg1, du1;
            swiglu_grad(g.x, u.x, dd.x, dg0, du0);
            swiglu_grad(g.y, u.y, dd.y, dg1, du1);
            *reinterpret_cast<P*>(o + f) = from_f2<P>(dg0, dg1);
            *reinterpret_cast<P*>(o + F + f) = from_f2<P>(du0, du1);
        } else {
            for (u32 j = f; j < min(f + 2, F); ++j) {
                float dg, du;
                swiglu_grad(to_f(row[j]), to_f(row[F + j]), to_f(d[j]), dg, du);
                o[j] = from_f<T>(dg);
                o[F + j] = from_f<T>(du);
            }
        }
    }
}

#define MOE_TYPED(T, SUF)                                                                                          \
    extern "C" __global__ void moe_permute_##SUF(const T* x, const u32* token_A, const u32* pos_A, u32 A, u32 D,   \
                                                 T* xp) {                                                          \
        permute<T>(x, token_A, pos_A, A, D, xp);                                                                   \
    }                                                                                                              \
    extern "C" __global__ void moe_gather_sum_##SUF(const T* y, const float* w_A, const u32* toff, const u32* list, \
                                                    const u32* pos_A, u32 N, u32 D, T* out) {                      \
        gather_sum<T>(y, w_A, toff, list, pos_A, N, D, out);                                                       \
    }                                                                                                              \
    extern "C" __global__ void moe_combine_bwd_##SUF(const T* dout, const T* y, const float* w_A,                  \
                                                     const u32* token_A, const u32* pos_A, u32 A, u32 D, T* dy,    \
                                                     float* dw_A) {                                                \
        combine_bwd<T>(dout, y, w_A, token_A, pos_A, A, D, dy, dw_A);                                              \
    }                                                                                                              \
    extern "C" __global__ void moe_swiglu_##SUF(const T* gu, u32 R, u32 F, T* out) { swiglu<T>(gu, R, F, out); }    \
    extern "C" __global__ void moe_swiglu_bwd_##SUF(const T* gu, const T* da, u32 R, u32 F, T* dgu) {              \
        swiglu_bwd<T>(gu, da, R, F, dgu);                                                                          \
    }

MOE_TYPED(float, f32)
MOE_TYPED(__nv_bfloat16, bf16)
