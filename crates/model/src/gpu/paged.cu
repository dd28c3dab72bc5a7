// Paged attention on CUDA: the GPU side of crates/model/src/nn/varlen.rs and kv_cache.rs.
//
// - kv_write_<T>: copy new key / value rows into their pool slots (pool[slot[t]] = src[t]).
// - varlen_attention_<T>: one block per (query n, head h). Query n sees the first keys[n] keys
//   of its sequence; key j is pool row table[start[n] + j / bs] * bs + j % bs. The keys are
//   taken in fixed chunks of CHUNK from key 0; per chunk: scores (a warp's fixed-order dot:
//   lane l sums d = l, l + 32, ... with fmaf, a fixed xor butterfly adds the lanes), the chunk's
//   max (exact in any order), e_j = expf(s_j - m_c), z_c = their sum in ascending order (one
//   thread), acc_c[d] = sum_j e_j v_j[d] in ascending order (fmaf); chunks merged in ascending
//   order: M' = max(M, m_c), Z = Z e^(M - M') + z_c e^(m_c - M'), A likewise; out = A / Z.
//   Every step depends on the query's own keys only, never on the launch around it, so a decode
//   step equals the trainer's forward over the whole sequence bit for bit, at any length.
//   Arithmetic in f32; T (f32 or bf16) is only the storage type.

#include <cuda_bf16.h>
#include <stdint.h>

#define CHUNK 128
#define THREADS 128
#define MAX_DH 512

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__device__ void kv_write(T* __restrict__ pool, const T* __restrict__ src, const uint32_t* __restrict__ slot,
                         uint32_t rows, uint32_t width) {
    const size_t total = (size_t)rows * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / width, e = i % width;
        pool[(size_t)slot[t] * width + e] = src[i];
    }
}

extern "C" __global__ void kv_write_f32(float* pool, const float* src, const uint32_t* slot, uint32_t rows, uint32_t width) {
    kv_write<float>(pool, src, slot, rows, width);
}
extern "C" __global__ void kv_write_bf16(__nv_bfloat16* pool, const __nv_bfloat16* src, const uint32_t* slot, uint32_t rows,
                                         uint32_t width) {
    kv_write<__nv_bfloat16>(pool, src, slot, rows, width);
}

template <typename T>
__device__ void varlen_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 const uint32_t* __restrict__ table, const uint32_t* __restrict__ start,
                                 const uint32_t* __restrict__ keys, T* __restrict__ out, uint32_t H, uint32_t G,
                                 uint32_t Dh, uint32_t bs, float scale) {
    __shared__ float qs[MAX_DH];
    __shared__ float s[CHUNK];
    __shared__ uint32_t krow[CHUNK];
    __shared__ float red[32];
    __shared__ float zc_sh;
    const size_t row = blockIdx.x;  // n * H + h
    const uint32_t n = row / H, h = row % H;
    const uint32_t g = h / (H / G);
    const uint32_t L = keys[n];
    const uint32_t* tab = table + start[n];
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    const size_t kstride = (size_t)G * Dh;  // one pool row
    for (uint32_t d = threadIdx.x; d < Dh; d += blockDim.x) qs[d] = ld(q[row * Dh + d]);
    // per thread: d = threadIdx.x + i * THREADS, i < MAX_DH / THREADS
    float A[MAX_DH / THREADS];
#pragma unroll
    for (int i = 0; i < MAX_DH / THREADS; i++) A[i] = 0.0f;
    float M = -INFINITY, Z = 0.0f;
    __syncthreads();
    for (uint32_t c0 = 0; c0 < L; c0 += CHUNK) {
        const uint32_t cl = min((uint32_t)CHUNK, L - c0);
        for (uint32_t j = threadIdx.x; j < cl; j += blockDim.x) {
            const uint32_t kj = c0 + j;
            krow[j] = tab[kj / bs] * bs + kj % bs;
        }
        __syncthreads();
        // 1. scores, a warp per key, and the chunk's max
        float mx = -INFINITY;
        for (uint32_t j = warp; j < cl; j += nwarps) {
            const T* kp = k + (size_t)krow[j] * kstride + (size_t)g * Dh;
            float acc = 0.0f;
            for (uint32_t d = lane; d < Dh; d += 32) acc = fmaf(qs[d], ld(kp[d]), acc);
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            const float sj = __shfl_sync(0xffffffffu, acc, 0) * scale;
            if (lane == 0) s[j] = sj;
            mx = fmaxf(mx, sj);
        }
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        if (lane == 0) red[warp] = mx;
        __syncthreads();
        float mc = -INFINITY;
        for (uint32_t w = 0; w < nwarps; w++) mc = fmaxf(mc, red[w]);
        // 2. exponentials, their sum in ascending order (one thread)
        for (uint32_t j = threadIdx.x; j < cl; j += blockDim.x) s[j] = expf(s[j] - mc);
        __syncthreads();
        if (threadIdx.x == 0) {
            float z = 0.0f;
            for (uint32_t j = 0; j < cl; j++) z += s[j];
            zc_sh = z;
        }
        __syncthreads();
        const float zc = zc_sh;
        // 3. merge: the running state rescaled, plus this chunk's weighted values
        float a = 1.0f, b = 1.0f, Mn = mc;
        if (c0 > 0) {
            Mn = fmaxf(M, mc);
            a = expf(M - Mn);
            b = expf(mc - Mn);
        }
#pragma unroll
        for (int i = 0; i < MAX_DH / THREADS; i++) {
            const uint32_t d = threadIdx.x + i * THREADS;
            if (d >= Dh) break;
            float acc = 0.0f;
            for (uint32_t j = 0; j < cl; j++) acc = fmaf(s[j], ld(v[(size_t)krow[j] * kstride + (size_t)g * Dh + d]), acc);
            A[i] = (c0 > 0) ? fmaf(A[i], a, acc * b) : acc;
        }
        Z = (c0 > 0) ? fmaf(Z, a, zc * b) : zc;
        M = Mn;
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < MAX_DH / THREADS; i++) {
        const uint32_t d = threadIdx.x + i * THREADS;
        if (d >= Dh) break;
        st(&out[row * Dh + d], A[i] / Z);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) varlen_attention_f32(
    const float* q, const float* k, const float* v, const uint32_t* table, const uint32_t* start, const uint32_t* keys,
    float* out, uint32_t H, uint32_t G, uint32_t Dh, uint32_t bs, float scale) {
    varlen_attention<float>(q, k, v, table, start, keys, out, H, G, Dh, bs, scale);
}
extern "C" __global__ void __launch_bounds__(THREADS) varlen_attention_bf16(
    const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const uint32_t* table, const uint32_t* start,
    const uint32_t* keys, __nv_bfloat16* out, uint32_t H, uint32_t G, uint32_t Dh, uint32_t bs, float scale) {
    varlen_attention<__nv_bfloat16>(q, k, v, table, start, keys, out, H, G, Dh, bs, scale);
}
