// The AdamW update's in-place element-wise ops (crates/model/src/adamw.rs defines them and their
// rounding): every step one correctly rounded f32 operation (__fmul_rn / __fadd_rn / __fsub_rn /
// __fdiv_rn / __fsqrt_rn: never contracted into a fused multiply-add, never reassociated) in
// the order of candle's composed ops, so the bits equal `StepHyper::update`'s on either device.
// A scalar product x·c is candle's affine(c, 0): x·c + 0 (the + 0 maps −0 to +0, so it stays).
//
// Grid-stride over size_t indices; any grid covers all n elements. Bandwidth-bound.

#include <cuda_bf16.h>
#include <stdint.h>

#define NT 256

struct Scalars {
    float scale;  // clip factor; used only when has_scale
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float inv_c1, inv_c2, eps, weight_decay, lr;
    int has_scale;
};

__device__ __forceinline__ float scaled(float x, float c) { return __fadd_rn(__fmul_rn(x, c), 0.0f); }

__device__ __forceinline__ float clipped(const Scalars& s, float g) { return s.has_scale ? scaled(g, s.scale) : g; }

extern "C" __global__ void __launch_bounds__(NT) adamw_moment1(float* __restrict__ m, const float* __restrict__ g, size_t n, Scalars s, int first) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float t = scaled(clipped(s, g[i]), s.one_minus_beta1);
        m[i] = first ? t : __fadd_rn(scaled(m[i], s.beta1), t);
    }
}

extern "C" __global__ void __launch_bounds__(NT) adamw_moment2(float* __restrict__ v, const float* __restrict__ g, size_t n, Scalars s, int first) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float c = clipped(s, g[i]);
        const float t = scaled(__fmul_rn(c, c), s.one_minus_beta2);
        v[i] = first ? t : __fadd_rn(scaled(v[i], s.beta2), t);
    }
}

extern "C" __global__ void __launch_bounds__(NT) adamw_theta(float* __restrict__ theta, const float* __restrict__ m, const float* __restrict__ v, size_t n, Scalars s) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float th = theta[i];
        const float num = scaled(m[i], s.inv_c1);
        const float den = __fadd_rn(__fmul_rn(__fsqrt_rn(scaled(v[i], s.inv_c2)), 1.0f), s.eps);
        const float u = __fadd_rn(__fdiv_rn(num, den), scaled(th, s.weight_decay));
        theta[i] = __fsub_rn(th, scaled(u, s.lr));
    }
}

extern "C" __global__ void __launch_bounds__(NT) adamw_cast_bf16(__nv_bfloat16* __restrict__ p, const float* __restrict__ theta, size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = __float2bfloat16_rn(theta[i]);
}

extern "C" __global__ void __launch_bounds__(NT) adamw_cast_f32(float* __restrict__ p, const float* __restrict__ theta, size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = theta[i];
}
