// One RMSNorm row of d <= 32 V values held in a warp's registers (included by norm.cu, whose
// rms_norm kernels store it, and by rope.cu, whose engine kernel normalises q / k rows before
// their rotary embedding): the arithmetic of norm.cu's header comment, in one place so both
// give the same bits.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float nr_f(float x) { return x; }
__device__ __forceinline__ float nr_f(__nv_bfloat16 x) { return __bfloat162float(x); }
// the normalised value rounded to the storage dtype (identity for f32)
__device__ __forceinline__ float nr_round(float v, const float*) { return v; }
__device__ __forceinline__ float nr_round(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

// The row's values x (i = lane, lane + 32, …; 0 past d) normalised in place: w loaded, s = Σ
// x_i² by fmaf in ascending i (a 0 past d leaves s unchanged: s >= 0), a fixed xor butterfly,
// r = 1 / sqrt(s / d + eps); x[u] = round(x_i · r) · w_i in f32 — the caller rounds it once to
// the storage dtype (0 past d). `tag` only picks the storage dtype's rounding. (In place: a
// 2,048-wide row is 64 values a lane, and a second array of them spills.)
template <typename T, int V>
__device__ __forceinline__ void norm_row_vals(float (&x)[V], const T* __restrict__ w, uint32_t d, float eps, uint32_t lane, const T* tag) {
    float wv[V];
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        wv[u] = i < d ? nr_f(w[i]) : 0.0f;
    }
    float s = 0.0f;
#pragma unroll
    for (int u = 0; u < V; u++) s = fmaf(x[u], x[u], s);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float r = 1.0f / sqrtf(s / (float)d + eps);
#pragma unroll
    for (int u = 0; u < V; u++) x[u] = nr_round(x[u] * r, tag) * wv[u];
}

// The same with the row loaded from xr into y, every load of x issued before the first use (a
// decode step's single row costs one memory round trip).
template <typename T, int V>
__device__ __forceinline__ void norm_row_regs(const T* __restrict__ xr, const T* __restrict__ w, uint32_t d, float eps, uint32_t lane,
                                              float (&y)[V]) {
#pragma unroll
    for (int u = 0; u < V; u++) {
        const uint32_t i = lane + 32u * u;
        y[u] = i < d ? nr_f(xr[i]) : 0.0f;
    }
    norm_row_vals<T, V>(y, w, d, eps, lane, xr);
}
