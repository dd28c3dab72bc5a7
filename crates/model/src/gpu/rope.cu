// Rotary embedding ("rotate half") of x [B, n, T, Dh] with tables cos, sin [B, 1, T, R]
// (crates/model/src/nn/rope.rs): for i < R, with h = R / 2 and rot_i = -x_{i+h} (i < h) or
// x_{i-h} (i >= h),
//   out_i = round(round(x_i · cos_i) + round(rot_i · sin_i))
// (each product and the sum rounded to the storage dtype, as the composed ops do); channels
// i >= R pass through. One thread per element.
//
// The backward (`rope_bwd_*`, linear in the output's gradient g): for i < R, in f32,
//   dx_i = round_f32(g_i · cos_i) + (i < h ? round_f32(g_{i+h} · sin_{i+h}) : -round_f32(g_{i-h} · sin_{i-h}))
// then rounded once to the storage dtype — the f32 composed ops' bits; dx_i = g_i past R.

#include <cuda_bf16.h>
#include <stdint.h>

#include "norm_row.cuh"

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ void store(float v, float* o) { *o = v; }
__device__ __forceinline__ void store(float v, __nv_bfloat16* o) { *o = __float2bfloat16_rn(v); }

// the table row b · T + t of the tok-th Dh-vector of x: [B, n, T, Dh], or [B, T, n, Dh] when
// token_major. The index type I is 32-bit when the launch's elements fit (the kernels below
// pick it per launch): 64-bit division is emulated, and was most of the kernel's time.
template <typename I>
__device__ __forceinline__ I table_row(I tok, uint32_t heads, uint32_t t, uint32_t token_major) {
    return token_major ? tok / heads : (tok / t / heads) * t + tok % t;
}

template <typename T, typename I>
__device__ void rope(const T* __restrict__ x, const T* __restrict__ cs, const T* __restrict__ sn, T* __restrict__ out,
                     uint64_t total, uint32_t heads, uint32_t t, uint32_t dh, uint32_t r, uint32_t token_major) {
    if ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x >= total) return;
    const I e = (I)((uint64_t)blockIdx.x * blockDim.x + threadIdx.x);
    const uint32_t i = e % dh;
    if (i >= r) {
        out[e] = x[e];
        return;
    }
    const I at = table_row<I>(e / dh, heads, t, token_major) * r + i;
    const uint32_t h = r / 2;
    const float rot = i < h ? -to_f(x[e + h]) : to_f(x[e - h]);
    // explicit roundings: no contraction of x·cos + rot·sin into one fma (the composed ops
    // round the products and the sum separately, in f32 as in bf16)
    const float a = rnd(__fmul_rn(to_f(x[e]), to_f(cs[at])), x), c = rnd(__fmul_rn(rot, to_f(sn[at])), x);
    store(__fadd_rn(a, c), out + e);
}

template <typename T, typename I>
__device__ void rope_bwd(const T* __restrict__ g, const T* __restrict__ cs, const T* __restrict__ sn, T* __restrict__ out,
                         uint64_t total, uint32_t heads, uint32_t t, uint32_t dh, uint32_t r, uint32_t token_major) {
    if ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x >= total) return;
    const I e = (I)((uint64_t)blockIdx.x * blockDim.x + threadIdx.x);
    const uint32_t i = e % dh;
    if (i >= r) {
        out[e] = g[e];
        return;
    }
    const I row = table_row<I>(e / dh, heads, t, token_major) * r;
    const uint32_t h = r / 2;
    const float gc = __fmul_rn(to_f(g[e]), to_f(cs[row + i]));
    const float back = i < h ? __fmul_rn(to_f(g[e + h]), to_f(sn[row + i + h])) : -__fmul_rn(to_f(g[e - h]), to_f(sn[row + i - h]));
    store(__fadd_rn(gc, back), out + e);
}

extern "C" __global__ void rope_bwd_f32(const float* g, const float* cs, const float* sn, float* out, uint64_t total, uint32_t heads, uint32_t t, uint32_t dh, uint32_t r, uint32_t token_major) {
    if (total <= 0xffffffffull) rope_bwd<float, uint32_t>(g, cs, sn, out, total, heads, t, dh, r, token_major);
    else rope_bwd<float, uint64_t>(g, cs, sn, out, total, heads, t, dh, r, token_major);
}
extern "C" __global__ void rope_bwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* cs, const __nv_bfloat16* sn, __nv_bfloat16* out, uint64_t total, uint32_t heads, uint32_t t, uint32_t dh, uint32_t r, uint32_t token_major) {
    if (total <= 0xffffffffull) rope_bwd<__nv_bfloat16, uint32_t>(g, cs, sn, out, total, heads, t, dh, r, token_major);
    else rope_bwd<__nv_bfloat16, uint64_t>(g, cs, sn, out, total, heads, t, dh, r, token_major);
}

extern "C" __global__ void rope_f32(const float* x, const float* cs, const float* sn, float* out, uint64_t total, uint32_t heads, uint32_t t, uint32_t dh, uint32_t r, uint32_t token_major) {
    if (total <= 0xffffffffull) rope<float, uint32_t>(x, cs, sn, out, total, heads, t, dh, r, token_major);
    else rope<float, uint64_t>(x, cs, sn, out, total, heads, t, dh, r, token_major);
}
extern "C" __global__ void rope_bf16(const __nv_bfloat16* x, const __nv_bfloat16* cs, const __nv_bfloat16* sn, __nv_bfloat16* out, uint64_t total, uint32_t heads, uint32_t t, uint32_t dh, uint32_t r, uint32_t token_major) {
    if (total <= 0xffffffffull) rope<__nv_bfloat16, uint32_t>(x, cs, sn, out, total, heads, t, dh, r, token_major);
    else rope<__nv_bfloat16, uint64_t>(x, cs, sn, out, total, heads, t, dh, r, token_major);
}

// The engine's q / k step of a paged forward in one launch (`qk_norm_rope_write_bf16`): for
// token n (its table row n: one packed row, B = 1) and head dim Dh = 32 V with the rotary over
// all of it, one warp a row —
//   q rows (n, h):  q_out[n, h] = rope(round(norm(q[n, h], qw, q_eps)))
//   k rows (n, g):  k_pool[slot[n], g] = rope(round(norm(k[n, g], kw, k_eps)))
//   v rows (n, g):  v_pool[slot[n], g] = v[n, g]
// with norm norm_row.cuh's (norm.cu's rms_norm bits) and rope the rope kernel's arithmetic on
// the rounded normalised values (rot_i = -y_{i+h} or y_{i-h} sits in the same lane, u ± V / 2):
// the bits of rms_norm, rope and kv_write launched one after another (six launches a layer).
// Warps stride over the N (H + 2 G) rows.
template <int V>
__device__ __forceinline__ void qk_rope_row(const __nv_bfloat16* __restrict__ xr, const __nv_bfloat16* __restrict__ w, float eps,
                                            const __nv_bfloat16* __restrict__ cs, const __nv_bfloat16* __restrict__ sn,
                                            __nv_bfloat16* __restrict__ orow, uint32_t lane) {
    constexpr uint32_t DH = 32 * V, H2 = V / 2;
    float y[V];
    norm_row_regs<__nv_bfloat16, V>(xr, w, DH, eps, lane, y);
#pragma unroll
    for (int u = 0; u < V; u++) y[u] = __bfloat162float(__float2bfloat16_rn(y[u]));
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        const float rot = u < (int)H2 ? -y[u + H2] : y[u - H2];
        const float a = rnd(__fmul_rn(y[u], to_f(cs[i])), xr), c = rnd(__fmul_rn(rot, to_f(sn[i])), xr);
        store(__fadd_rn(a, c), orow + i);
    }
}
template <int V>
__device__ void qk_norm_rope_write(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                   const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ qw,
                                   const __nv_bfloat16* __restrict__ kw, float q_eps, float k_eps,
                                   const __nv_bfloat16* __restrict__ cs, const __nv_bfloat16* __restrict__ sn,
                                   __nv_bfloat16* __restrict__ q_out, __nv_bfloat16* __restrict__ k_pool,
                                   __nv_bfloat16* __restrict__ v_pool, const uint32_t* __restrict__ slot, uint32_t n_tok,
                                   uint32_t heads, uint32_t groups) {
    constexpr uint32_t DH = 32 * V;
    const uint32_t lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const uint64_t nq = (uint64_t)n_tok * heads, nk = (uint64_t)n_tok * groups, rows = nq + 2 * nk;
    for (uint64_t row = (uint64_t)blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += (uint64_t)gridDim.x * warps) {
        if (row < nq) {
            const uint64_t n = row / heads;
            qk_rope_row<V>(q + row * DH, qw, q_eps, cs + n * DH, sn + n * DH, q_out + row * DH, lane);
        } else if (row < nq + nk) {
            const uint64_t r = row - nq, n = r / groups, g = r % groups;
            qk_rope_row<V>(k + r * DH, kw, k_eps, cs + n * DH, sn + n * DH, k_pool + ((uint64_t)slot[n] * groups + g) * DH, lane);
        } else {
            const uint64_t r = row - nq - nk, n = r / groups, g = r % groups;
            __nv_bfloat16* dst = v_pool + ((uint64_t)slot[n] * groups + g) * DH;
#pragma unroll
            for (int u = 0; u < V; u++) dst[lane + 32u * u] = v[r * DH + lane + 32u * u];
        }
    }
}
#define QK_NORM_ROPE_WRITE(DH)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) qk_norm_rope_write_bf16_##DH(                                \
        const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* qw,           \
        const __nv_bfloat16* kw, float q_eps, float k_eps, const __nv_bfloat16* cs, const __nv_bfloat16* sn,       \
        __nv_bfloat16* q_out, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool, const uint32_t* slot, uint32_t n_tok, \
        uint32_t heads, uint32_t groups) {                                                                         \
        qk_norm_rope_write<DH / 32>(q, k, v, qw, kw, q_eps, k_eps, cs, sn, q_out, k_pool, v_pool, slot, n_tok,    \
                                    heads, groups);                                                                \
    }
QK_NORM_ROPE_WRITE(128)
