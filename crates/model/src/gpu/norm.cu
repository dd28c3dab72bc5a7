// RMSNorm, one warp per row (crates/model/src/nn/norm.rs defines it):
//   s = Σ_i x_i² (f32; lane l takes i = l, l + 32, … in order, then a fixed xor butterfly),
//   r = 1 / sqrt(s / D + eps), out_i = round(round(x_i · r) · w_i) in the input's dtype.
// A row's arithmetic depends on that row alone, so the result is batch-invariant.

#include <cuda_bf16.h>
#include <stdint.h>

#define NT 128
#define WARPS (NT / 32)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float v, float* o) { *o = v; }
__device__ __forceinline__ void from_f(float v, __nv_bfloat16* o) { *o = __float2bfloat16_rn(v); }
// the normalised value rounded to the storage dtype (identity for f32)
__device__ __forceinline__ float round_as(float v, const float*) { return v; }
__device__ __forceinline__ float round_as(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, uint32_t rows, uint32_t d, float eps) {
    const uint32_t row = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    T* orow = out + (size_t)row * d;
    float s = 0.0f;
    for (uint32_t i = lane; i < d; i += 32) {
        const float v = to_f(xr[i]);
        s = fmaf(v, v, s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float r = 1.0f / sqrtf(s / (float)d + eps);
    for (uint32_t i = lane; i < d; i += 32) from_f(round_as(to_f(xr[i]) * r, xr) * to_f(w[i]), orow + i);
}

extern "C" __global__ void __launch_bounds__(NT) rms_norm_f32(const float* x, const float* w, float* out, uint32_t rows, uint32_t d, float eps) {
    rms_norm<float>(x, w, out, rows, d, eps);
}
extern "C" __global__ void __launch_bounds__(NT) rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, uint32_t rows, uint32_t d, float eps) {
    rms_norm<__nv_bfloat16>(x, w, out, rows, d, eps);
}
