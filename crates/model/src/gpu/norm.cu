// RMSNorm and its backward, one warp a row (crates/model/src/nn/norm.rs defines it):
//   s = Σ_i x_i² (f32; lane l takes i = l, l + 32, … in order, then a fixed xor butterfly),
//   r = 1 / sqrt(s / D + eps), out_i = round(round(x_i · r) · w_i) in the input's dtype.
// A row's arithmetic depends on that row alone, so the result is batch-invariant.

#include <cuda_bf16.h>
#include <stdint.h>

#include "norm_row.cuh"

#define NT 128
#define WARPS (NT / 32)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float v, float* o) { *o = v; }
__device__ __forceinline__ void from_f(float v, __nv_bfloat16* o) { *o = __float2bfloat16_rn(v); }
// the normalised value rounded to the storage dtype (identity for f32)
__device__ __forceinline__ float round_as(float v, const float*) { return v; }
__device__ __forceinline__ float round_as(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

// r = 1 / sqrt(s / D + eps), s = Σ_i x_i² (lane l: i = l, l + 32, … in order, 8 loads in flight;
// then a fixed xor butterfly), the same in every lane
template <typename T>
__device__ __forceinline__ float row_rsqrt(const T* __restrict__ xr, uint32_t d, float eps, uint32_t lane) {
    float s = 0.0f;
    uint32_t i = lane;
    for (; i + 7 * 32 < d; i += 8 * 32) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = to_f(xr[i + 32 * u]);
#pragma unroll
        for (int u = 0; u < 8; u++) s = fmaf(v[u], v[u], s);
    }
    for (; i < d; i += 32) {
        const float v = to_f(xr[i]);
        s = fmaf(v, v, s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return 1.0f / sqrtf(s / (float)d + eps);
}

// A row of d <= 32 V held in registers (norm_row.cuh: the same arithmetic as row_rsqrt and the
// loop below), stored rounded to the row's dtype.
template <typename T, int V>
__device__ __forceinline__ void rms_norm_regs(const T* __restrict__ xr, const T* __restrict__ w, T* __restrict__ orow, uint32_t d, float eps, uint32_t lane) {
    float y[V];
    norm_row_regs<T, V>(xr, w, d, eps, lane, y);
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        if (i < d) from_f(y[u], orow + i);
    }
}

template <typename T>
__device__ __forceinline__ void rms_norm_row(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, uint32_t row, uint32_t d, float eps, uint32_t lane) {
    const T* xr = x + (size_t)row * d;
    T* orow = out + (size_t)row * d;
    // (d is uniform over the launch: no divergence)
    if (d <= 32 * 4) return rms_norm_regs<T, 4>(xr, w, orow, d, eps, lane);
    if (d <= 32 * 16) return rms_norm_regs<T, 16>(xr, w, orow, d, eps, lane);
    if (d <= 32 * 64) return rms_norm_regs<T, 64>(xr, w, orow, d, eps, lane);
    const float r = row_rsqrt(xr, d, eps, lane);
#pragma unroll 4
    for (uint32_t i = lane; i < d; i += 32) from_f(round_as(to_f(xr[i]) * r, xr) * to_f(w[i]), orow + i);
}
// Each warp takes rows warp, warp + W, … (W = the launch's warps: the host caps the grid, so a
// launch over the 262,144 128-wide q-norm rows of an 8,192-token prefill is not 65,536 tiny
// blocks); a row's arithmetic is rms_norm_row's whichever warp runs it.
template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, uint32_t rows, uint32_t d, float eps) {
    const uint32_t lane = threadIdx.x & 31;
    for (uint64_t row = blockIdx.x * WARPS + (threadIdx.x >> 5); row < rows; row += (uint64_t)gridDim.x * WARPS)
        rms_norm_row(x, w, out, (uint32_t)row, d, eps, lane);
}

// The engine's residual add and the norm after it in one launch (add_rms_norm_*): for row n,
// s[n] = a[n] + b[n] in the storage dtype (bf16: the correctly rounded sum, candle's badd; f32:
// the f32 sum) and y[n] = rms_norm(s[n]) — rms_norm_row's bits on those rounded values. Rows of
// d <= 2048 (the register path); out is [2, N, D]: the sums, then the normalised rows.
__device__ __forceinline__ float add_as(float x, float y) { return x + y; }
__device__ __forceinline__ __nv_bfloat16 add_as(__nv_bfloat16 x, __nv_bfloat16 y) { return __hadd(x, y); }
template <typename T, int V>
__device__ __forceinline__ void add_norm_row(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, T* __restrict__ srow,
                                             T* __restrict__ yrow, uint32_t d, float eps, uint32_t lane) {
    // every load issued before the first store (a store between them would wait each load out:
    // 64 round trips for a 2,048-wide row)
    float xv[V];
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        xv[u] = i < d ? to_f(add_as(a[i], b[i])) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        if (i < d) from_f(xv[u], srow + i);  // exact: xv holds the dtype's sum
    }
    norm_row_vals<T, V>(xv, w, d, eps, lane, a);
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        if (i < d) from_f(xv[u], yrow + i);
    }
}
template <typename T>
__device__ void add_rms_norm(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, T* __restrict__ out, uint32_t rows,
                             uint32_t d, float eps) {
    const uint32_t lane = threadIdx.x & 31;
    const size_t half = (size_t)rows * d;
    for (uint64_t row = blockIdx.x * WARPS + (threadIdx.x >> 5); row < rows; row += (uint64_t)gridDim.x * WARPS) {
        const size_t o = row * d;
        if (d <= 32 * 4) add_norm_row<T, 4>(a + o, b + o, w, out + o, out + half + o, d, eps, lane);
        else if (d <= 32 * 16) add_norm_row<T, 16>(a + o, b + o, w, out + o, out + half + o, d, eps, lane);
        else add_norm_row<T, 64>(a + o, b + o, w, out + o, out + half + o, d, eps, lane);
    }
}
extern "C" __global__ void __launch_bounds__(NT) add_rms_norm_f32(const float* a, const float* b, const float* w, float* out, uint32_t rows, uint32_t d, float eps) {
    add_rms_norm<float>(a, b, w, out, rows, d, eps);
}
extern "C" __global__ void __launch_bounds__(NT) add_rms_norm_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* w, __nv_bfloat16* out, uint32_t rows, uint32_t d, float eps) {
    add_rms_norm<__nv_bfloat16>(a, b, w, out, rows, d, eps);
}

// The backward, one warp per row, with n = x · r and dn = g · w (f32):
//   dx = r · (dn − n · mean(dn · n))            (in x's dtype)
//   pw = g · round(n)                           (f32 [rows, d]: dw = Σ_rows pw, summed by the host)
// either output may be a null pointer (not written; the mean is skipped without dx)
// (the sums lane-strided then a fixed xor butterfly, as the forward's; not compared bitwise)
template <typename T>
__device__ __forceinline__ void rms_norm_bwd_row(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ g, T* __restrict__ dx,
                                                 float* __restrict__ pw, uint32_t row, uint32_t d, float eps, uint32_t lane) {
    const size_t base = (size_t)row * d;
    const T* xr = x + base;
    const T* gr = g + base;
    const float r = row_rsqrt(xr, d, eps, lane);
    float m = 0.0f;
    if (dx != nullptr) {
#pragma unroll 4
        for (uint32_t i = lane; i < d; i += 32) m = fmaf(to_f(gr[i]) * to_f(w[i]), to_f(xr[i]) * r, m);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m += __shfl_xor_sync(0xffffffffu, m, o);
        m /= (float)d;
    }
#pragma unroll 4
    for (uint32_t i = lane; i < d; i += 32) {
        const float n = to_f(xr[i]) * r, gi = to_f(gr[i]);
        if (dx != nullptr) from_f(r * (gi * to_f(w[i]) - n * m), dx + base + i);
        if (pw != nullptr) pw[base + i] = gi * round_as(n, xr);
    }
}
// rows strided over the launch's warps, as the forward's
template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ g, T* __restrict__ dx,
                             float* __restrict__ pw, uint32_t rows, uint32_t d, float eps) {
    const uint32_t lane = threadIdx.x & 31;
    for (uint64_t row = blockIdx.x * WARPS + (threadIdx.x >> 5); row < rows; row += (uint64_t)gridDim.x * WARPS)
        rms_norm_bwd_row(x, w, g, dx, pw, (uint32_t)row, d, eps, lane);
}

extern "C" __global__ void __launch_bounds__(NT) rms_norm_f32(const float* x, const float* w, float* out, uint32_t rows, uint32_t d, float eps) {
    rms_norm<float>(x, w, out, rows, d, eps);
}
extern "C" __global__ void __launch_bounds__(NT) rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, uint32_t rows, uint32_t d, float eps) {
    rms_norm<__nv_bfloat16>(x, w, out, rows, d, eps);
}

extern "C" __global__ void __launch_bounds__(NT) rms_norm_bwd_f32(const float* x, const float* w, const float* g, float* dx, float* pw, uint32_t rows, uint32_t d, float eps) {
    rms_norm_bwd<float>(x, w, g, dx, pw, rows, d, eps);
}
extern "C" __global__ void __launch_bounds__(NT) rms_norm_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* g, __nv_bfloat16* dx, float* pw, uint32_t rows, uint32_t d, float eps) {
    rms_norm_bwd<__nv_bfloat16>(x, w, g, dx, pw, rows, d, eps);
}
