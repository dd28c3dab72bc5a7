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
