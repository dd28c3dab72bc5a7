// In-place f32 gradient sums (crates/model/src/accumulate.rs defines them):
//   acc[i] = acc[i] + (float)g[i]   for i < n,
// one correctly rounded f32 add per element (__fadd_rn: never contracted, never reassociated),
// g f32 or bf16 (bf16 → f32 is exact: the bits shifted up by 16), so the result has the bits of
// candle's `acc + g.to_dtype(F32)`. Bandwidth-bound: read 4 B + sizeof(G), write 4 B per element.
//
// Grid-stride over size_t indices (gradients of 4·10⁸ elements and more). Four elements per
// thread step when acc and g share their misalignment within a 4-element vector (float4 of acc,
// float4 / 8-byte bf16 quad of g): a scalar head brings both to the vector boundary, a scalar
// tail finishes; otherwise every element is done alone. Any grid of ≥ 1 block of ≥ 4 threads
// covers all n elements.

#include <cuda_bf16.h>
#include <stdint.h>

#define NT 256

// the source element widened to f32 (exact)
__device__ __forceinline__ float widen(float g) { return g; }
__device__ __forceinline__ float widen(__nv_bfloat16 g) { return __bfloat162float(g); }

// four consecutive source elements widened to f32; p is aligned to 4 · sizeof(element)
__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
    // little-endian: element 2k is the low half of word k, 2k + 1 its high half
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    return make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u), __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u));
}

template <typename G>
__device__ __forceinline__ void add1(float* __restrict__ acc, const G* __restrict__ g, size_t i) {
    acc[i] = __fadd_rn(acc[i], widen(g[i]));
}

template <typename G>
__device__ void accumulate(float* __restrict__ acc, const G* __restrict__ g, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    // misalignment of each pointer within its 4-element vector, in elements (the same in every
    // thread: no divergence)
    const size_t ma = ((uintptr_t)acc / sizeof(float)) % 4, mg = ((uintptr_t)g / sizeof(G)) % 4;
    if (ma != mg) {
        for (size_t i = tid; i < n; i += stride) add1(acc, g, i);
        return;
    }
    size_t head = (4 - ma) % 4;
    if (head > n) head = n;
    const size_t vecs = (n - head) / 4, tail = head + vecs * 4;
    if (tid < head) add1(acc, g, tid);
    float4* __restrict__ a4 = reinterpret_cast<float4*>(acc + head);
    const G* __restrict__ gv = g + head;
    for (size_t v = tid; v < vecs; v += stride) {
        float4 a = a4[v];
        const float4 b = load4(gv + 4 * v);
        a.x = __fadd_rn(a.x, b.x);
        a.y = __fadd_rn(a.y, b.y);
        a.z = __fadd_rn(a.z, b.z);
        a.w = __fadd_rn(a.w, b.w);
        a4[v] = a;
    }
    if (tail + tid < n) add1(acc, g, tail + tid);
}

extern "C" __global__ void __launch_bounds__(NT) accumulate_f32_f32(float* __restrict__ acc, const float* __restrict__ g, size_t n) {
    accumulate<float>(acc, g, n);
}
extern "C" __global__ void __launch_bounds__(NT) accumulate_f32_bf16(float* __restrict__ acc, const __nv_bfloat16* __restrict__ g, size_t n) {
    accumulate<__nv_bfloat16>(acc, g, n);
}
