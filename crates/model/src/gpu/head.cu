// The LM head's log-probability / entropy surrogate and its gradient (crate::head_grad defines
// both; this is the same arithmetic in f32). Per row of logits z [C, V] with x = z * inv_t:
//   lse = m + ln S,  S = sum_j exp(x_j - m),  m = max_j x_j,  W = sum_j exp(x_j - m) (x_j - m)
//   lp  = x_t - lse,  h = ln S - W / S  (= lse - sum_j p_j x_j)
//   value[row] = g_lp lp + g_h h                               (head_value_*)
//   (lp, h, lse)[row]                                          (head_stats_*: the forward)
//   dz_j = inv_t [g_lp (1[j = t] - p_j) - g_h p_j (log p_j + h)]   (head_grad_*)
// g_h is a null pointer when the entropy takes no gradient. One block of HEAD_THREADS threads per
// row: pass 1 keeps an online (m, S, W) per thread over a block-strided walk of the row, merged
// by warp shuffles and then across warps in shared memory; pass 2 (gradient only) walks the row
// again and writes dz. -inf logits contribute nothing (p = 0, no 0 * inf); a target id >= V is
// never read and gives NaN (the host checks ids before launching).

#include <stdint.h>
#include <cuda_bf16.h>

#define HEAD_THREADS 512
#define HEAD_WARPS (HEAD_THREADS / 32)
// a quiet NaN (an intrinsic: no dependence on the host math headers)
#define HD_NAN __int_as_float(0x7fc00000)

__device__ __forceinline__ float hd_load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float hd_load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void hd_store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void hd_store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// running state of a row segment: m its max, s = sum exp(x - m), w = sum exp(x - m) (x - m);
// an empty segment is (-inf, 0, 0)
struct HdStats {
    float m, s, w;
};

// the state with x added
__device__ __forceinline__ void hd_push(HdStats& a, float x) {
    if (x == -INFINITY) return;
    if (x > a.m) {
        const float d = a.m - x; // <= 0; -inf when a is empty
        const float sc = expf(d);
        a.w = a.s > 0.f ? sc * (a.w + d * a.s) : 0.f;
        a.s = a.s * sc + 1.f;
        a.m = x;
    } else {
        const float d = x - a.m;
        const float e = expf(d);
        a.s += e;
        if (e > 0.f) a.w += e * d;
    }
}

// the state of two segments together
__device__ __forceinline__ HdStats hd_merge(HdStats a, HdStats b) {
    const float m = fmaxf(a.m, b.m);
    HdStats r{m, 0.f, 0.f};
    if (a.s > 0.f) {
        const float d = a.m - m, sc = expf(d);
        r.s += a.s * sc;
        r.w += sc * (a.w + d * a.s);
    }
    if (b.s > 0.f) {
        const float d = b.m - m, sc = expf(d);
        r.s += b.s * sc;
        r.w += sc * (b.w + d * b.s);
    }
    return r;
}

// the row's state, the same in every thread of the block
template <typename T>
__device__ __forceinline__ HdStats hd_row_stats(const T* __restrict__ z, uint32_t V, float inv_t) {
    __shared__ HdStats s_warp[HEAD_WARPS];
    __shared__ HdStats s_all;
    const uint32_t tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    HdStats a{-INFINITY, 0.f, 0.f};
    for (uint32_t i = tid; i < V; i += HEAD_THREADS) hd_push(a, hd_load(z, i) * inv_t);
    for (int off = 16; off > 0; off >>= 1) {
        HdStats b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, off);
        b.w = __shfl_xor_sync(0xffffffffu, a.w, off);
        a = hd_merge(a, b);
    }
    if (lane == 0) s_warp[warp] = a;
    __syncthreads();
    if (tid == 0) {
        HdStats r = s_warp[0];
        for (uint32_t k = 1; k < HEAD_WARPS; ++k) r = hd_merge(r, s_warp[k]);
        s_all = r;
    }
    __syncthreads();
    return s_all;
}

// value[row] = g_lp[row] lp + (g_h ? g_h[row] h : 0)
template <typename T>
__device__ __forceinline__ void hd_value(const T* __restrict__ logits, uint32_t V, const uint32_t* __restrict__ target,
                                         const float* __restrict__ g_lp, const float* __restrict__ g_h, float inv_t,
                                         float* __restrict__ out) {
    const uint32_t row = blockIdx.x;
    const T* z = logits + (size_t)row * V;
    const HdStats st = hd_row_stats(z, V, inv_t);
    if (threadIdx.x == 0) {
        const uint32_t t = target[row];
        const float ls = logf(st.s);
        const float lse = st.m + ls;
        const float lp = t < V ? hd_load(z, t) * inv_t - lse : HD_NAN;
        float v = g_lp[row] * lp;
        if (g_h != nullptr) v += g_h[row] * (ls - st.w / st.s);
        out[row] = v;
    }
}

// dz[row, j] for every j < V
template <typename T>
__device__ __forceinline__ void hd_grad(const T* __restrict__ logits, uint32_t V, const uint32_t* __restrict__ target,
                                        const float* __restrict__ g_lp, const float* __restrict__ g_h, float inv_t,
                                        T* __restrict__ dz) {
    const uint32_t row = blockIdx.x;
    const size_t base = (size_t)row * V;
    const T* z = logits + base;
    const HdStats st = hd_row_stats(z, V, inv_t);
    const uint32_t t = target[row];
    const float ls = logf(st.s);
    const float lse = st.m + ls;
    const float h = ls - st.w / st.s;
    const float gl = t < V ? g_lp[row] : HD_NAN;
    const float gh = g_h != nullptr ? g_h[row] : 0.f;
    for (uint32_t j = threadIdx.x; j < V; j += HEAD_THREADS) {
        const float lpj = hd_load(z, j) * inv_t - lse;
        const float p = expf(lpj);
        float d = (j == t ? gl : 0.f) - gl * p;
        if (g_h != nullptr && p > 0.f) d -= gh * p * (lpj + h);
        hd_store(dz, base + j, d * inv_t);
    }
}

// out[row] = (lp, h, lse): the forward's log-probability of the target, the entropy and the
// log-sum-exp at temperature (no gradient; what the engine records and the trainer scores)
template <typename T>
__device__ __forceinline__ void hd_stats(const T* __restrict__ logits, uint32_t V, const uint32_t* __restrict__ target,
                                         float inv_t, float* __restrict__ out) {
    const uint32_t row = blockIdx.x;
    const T* z = logits + (size_t)row * V;
    const HdStats st = hd_row_stats(z, V, inv_t);
    if (threadIdx.x == 0) {
        const uint32_t t = target[row];
        const float ls = logf(st.s);
        const float lse = st.m + ls;
        out[3 * (size_t)row] = t < V ? __fsub_rn(__fmul_rn(hd_load(z, t), inv_t), lse) : HD_NAN;
        out[3 * (size_t)row + 1] = ls - st.w / st.s;
        out[3 * (size_t)row + 2] = lse;
    }
}

#define HEAD_KERNELS(SUF, T)                                                                                       \
    extern "C" __global__ void __launch_bounds__(HEAD_THREADS)                                                     \
        head_value_##SUF(const T* __restrict__ logits, uint32_t V, const uint32_t* __restrict__ target,           \
                         const float* __restrict__ g_lp, const float* __restrict__ g_h, float inv_t,              \
                         float* __restrict__ out) {                                                                \
        hd_value<T>(logits, V, target, g_lp, g_h, inv_t, out);                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(HEAD_THREADS)                                                     \
        head_grad_##SUF(const T* __restrict__ logits, uint32_t V, const uint32_t* __restrict__ target,            \
                        const float* __restrict__ g_lp, const float* __restrict__ g_h, float inv_t,               \
                        T* __restrict__ dz) {                                                                      \
        hd_grad<T>(logits, V, target, g_lp, g_h, inv_t, dz);                                                       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(HEAD_THREADS)                                                     \
        head_stats_##SUF(const T* __restrict__ logits, uint32_t V, const uint32_t* __restrict__ target,           \
                         float inv_t, float* __restrict__ out) {                                                   \
        hd_stats<T>(logits, V, target, inv_t, out);                                                                \
    }

HEAD_KERNELS(f32, float)
HEAD_KERNELS(bf16, __nv_bfloat16)
