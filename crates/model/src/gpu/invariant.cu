// Batch-invariant kernels on CUDA (the GPU side of crates/model/src/nn/invariant.rs).
//
// Every output element is computed by one fixed sequence of floating-point operations that
// depends only on its own row's data and the problem's inner sizes (K, Dh, the visible keys),
// never on how many rows the launch holds, where the row sits in it, or which block computes it.
// So a decode step over a KV cache (one row) reproduces the trainer's packed forward (many rows)
// bit for bit. cuBLAS does not: it picks its tiling and split-K by M.
//
// - inv_matmul_nt_f32(_skinny): y[m, n] = sum_k x[m, k] * w[n, k], one f32 accumulator, k
//   ascending, fmaf. Tiles only decide which thread does the work, never the order; the
//   skinny variant (few rows, more blocks) computes each element identically.
// - inv_matmul_nt_bf16(_skinny): the same product on tensor cores (mma over 16-wide K chunks,
//   ascending, f32 accumulation); the skinny variant is one warp per 16 x 16 tile.
// - inv_attention_f32: per query row, over the visible keys: s_j = dot(q, k_j) * scale (one
//   warp's fixed-order dot), softmax with max subtraction and a sequential sum, then
//   out[d] = sum_j p_j v_j[d] in ascending key order. Masked keys are skipped, not added as zeros.

#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

#define TM 64
#define TN 64
#define TK 16

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// 256 threads (16 x 16), each computing a 4 x 4 block of a 64 x 64 output tile.
template <typename T>
__device__ void matmul_nt(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                          uint32_t M, uint32_t N, uint32_t K) {
    __shared__ float xs[TK][TM + 1];
    __shared__ float ws[TK][TN + 1];
    const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
    const size_t m0 = (size_t)blockIdx.y * TM, n0 = (size_t)blockIdx.x * TN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (uint32_t k0 = 0; k0 < K; k0 += TK) {
        for (uint32_t e = tid; e < TM * TK; e += 256) {
            const uint32_t r = e / TK, c = e % TK;
            const size_t m = m0 + r, n = n0 + r, k = k0 + c;
            xs[c][r] = (m < M && k < K) ? to_f32(x[m * K + k]) : 0.0f;
            ws[c][r] = (n < N && k < K) ? to_f32(w[n * K + k]) : 0.0f;
        }
        __syncthreads();
        const uint32_t kmax = min((uint32_t)TK, K - k0);
        for (uint32_t kk = 0; kk < kmax; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const size_t m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const size_t n = n0 + tx + 16 * j;
            if (n < N) store(&y[m * N + n], acc[i][j]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) inv_matmul_nt_f32(const float* x, const float* w, float* y,
                                                                    uint32_t M, uint32_t N, uint32_t K) {
    matmul_nt<float>(x, w, y, M, N, K);
}

// Few rows (decode steps): 128 threads, an 8 x 16 output tile, one output per thread, K staged
// 32 at a time. The same fmaf chain over ascending k as inv_matmul_nt_f32, so a row's result
// does not depend on which of the two kernels the launch picks.
#define SM_ROWS 8
#define SN_COLS 16
#define SK_STEP 32
extern "C" __global__ void __launch_bounds__(128) inv_matmul_nt_f32_skinny(const float* __restrict__ x,
                                                                           const float* __restrict__ w,
                                                                           float* __restrict__ y, uint32_t M,
                                                                           uint32_t N, uint32_t K) {
    __shared__ float xs[SM_ROWS][SK_STEP + 1];
    __shared__ float ws[SN_COLS][SK_STEP + 1];
    const uint32_t tid = threadIdx.x, r = tid / SN_COLS, c = tid % SN_COLS;
    const size_t m0 = (size_t)blockIdx.y * SM_ROWS, n0 = (size_t)blockIdx.x * SN_COLS;
    float acc = 0.0f;
    for (uint32_t k0 = 0; k0 < K; k0 += SK_STEP) {
        for (uint32_t e = tid; e < SM_ROWS * SK_STEP; e += 128) {
            const uint32_t rr = e / SK_STEP, cc = e % SK_STEP;
            const size_t m = m0 + rr, k = k0 + cc;
            xs[rr][cc] = (m < M && k < K) ? x[m * K + k] : 0.0f;
        }
        for (uint32_t e = tid; e < SN_COLS * SK_STEP; e += 128) {
            const uint32_t rr = e / SK_STEP, cc = e % SK_STEP;
            const size_t n = n0 + rr, k = k0 + cc;
            ws[rr][cc] = (n < N && k < K) ? w[n * K + k] : 0.0f;
        }
        __syncthreads();
        const uint32_t kmax = min((uint32_t)SK_STEP, K - k0);
        for (uint32_t kk = 0; kk < kmax; kk++) acc = fmaf(xs[r][kk], ws[c][kk], acc);
        __syncthreads();
    }
    const size_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) y[m * N + n] = acc;
}

// bf16 on tensor cores (WMMA 16x16x16, f32 accumulators): every output element is the same
// sequence of mma steps over K in ascending 16-wide chunks, whatever tile or fragment position it
// falls in (an mma computes each element from its own row and column only). 128 threads, a 64 x 64
// output tile, 4 warps of 32 x 32, K staged 32 at a time.
#define WBM 64
#define WBN 64
#define WBK 32
#define WPAD 8
extern "C" __global__ void __launch_bounds__(128) inv_matmul_nt_bf16(const __nv_bfloat16* __restrict__ x,
                                                                     const __nv_bfloat16* __restrict__ w,
                                                                     __nv_bfloat16* __restrict__ y, uint32_t M,
                                                                     uint32_t N, uint32_t K) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 As[WBM][WBK + WPAD];
    __shared__ __align__(32) __nv_bfloat16 Bs[WBN][WBK + WPAD];
    __shared__ __align__(32) float Cs[WBM][WBN + 4];
    const uint32_t tid = threadIdx.x, warp = tid / 32;
    const size_t m0 = (size_t)blockIdx.y * WBM, n0 = (size_t)blockIdx.x * WBN;
    const uint32_t wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const bool vec = (K % 8 == 0) && ((uintptr_t)x % 16 == 0) && ((uintptr_t)w % 16 == 0);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0.0f);
    const __nv_bfloat16 zero = __float2bfloat16(0.0f);
    for (uint32_t k0 = 0; k0 < K; k0 += WBK) {
        // stage A (x rows) and B (w rows): 64 rows x 32 k each, 8 elements per step
        for (uint32_t v = tid; v < WBM * WBK / 8; v += 128) {
            const uint32_t r = v / (WBK / 8), c8 = (v % (WBK / 8)) * 8;
            const size_t k = k0 + c8;
            const size_t m = m0 + r, n = n0 + r;
            if (vec && m < M && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&As[r][c8]) = *reinterpret_cast<const uint4*>(&x[m * K + k]);
            } else {
                for (int e = 0; e < 8; e++) As[r][c8 + e] = (m < M && k + e < K) ? x[m * K + k + e] : zero;
            }
            if (vec && n < N && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&Bs[r][c8]) = *reinterpret_cast<const uint4*>(&w[n * K + k]);
            } else {
                for (int e = 0; e < 8; e++) Bs[r][c8 + e] = (n < N && k + e < K) ? w[n * K + k + e] : zero;
            }
        }
        __syncthreads();
#pragma unroll
        for (uint32_t kk = 0; kk < WBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], &As[wm + 16 * i][kk], WBK + WPAD);
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[wn + 16 * j][kk], WBK + WPAD);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], c[i][j], WBN + 4, wmma::mem_row_major);
    __syncthreads();
    for (uint32_t e = tid; e < WBM * WBN; e += 128) {
        const uint32_t r = e / WBN, cc = e % WBN;
        const size_t m = m0 + r, n = n0 + cc;
        if (m < M && n < N) y[m * N + n] = __float2bfloat16(Cs[r][cc]);
    }
}

// Few rows, bf16: one warp per 16 x 16 output tile, the same mma sequence per element as
// inv_matmul_nt_bf16 (16-wide K chunks, ascending), so either kernel gives a row the same bits.
extern "C" __global__ void __launch_bounds__(32) inv_matmul_nt_bf16_skinny(const __nv_bfloat16* __restrict__ x,
                                                                           const __nv_bfloat16* __restrict__ w,
                                                                           __nv_bfloat16* __restrict__ y, uint32_t M,
                                                                           uint32_t N, uint32_t K) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 As[16][WBK + WPAD];
    __shared__ __align__(32) __nv_bfloat16 Bs[16][WBK + WPAD];
    __shared__ __align__(32) float Cs[16][16 + 4];
    const uint32_t lane = threadIdx.x;
    const size_t m0 = (size_t)blockIdx.y * 16, n0 = (size_t)blockIdx.x * 16;
    const bool vec = (K % 8 == 0) && ((uintptr_t)x % 16 == 0) && ((uintptr_t)w % 16 == 0);
    const __nv_bfloat16 zero = __float2bfloat16(0.0f);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    for (uint32_t k0 = 0; k0 < K; k0 += WBK) {
        for (uint32_t v = lane; v < 16 * WBK / 8; v += 32) {
            const uint32_t r = v / (WBK / 8), c8 = (v % (WBK / 8)) * 8;
            const size_t k = k0 + c8, m = m0 + r, n = n0 + r;
            if (vec && m < M && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&As[r][c8]) = *reinterpret_cast<const uint4*>(&x[m * K + k]);
            } else {
                for (int e = 0; e < 8; e++) As[r][c8 + e] = (m < M && k + e < K) ? x[m * K + k + e] : zero;
            }
            if (vec && n < N && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&Bs[r][c8]) = *reinterpret_cast<const uint4*>(&w[n * K + k]);
            } else {
                for (int e = 0; e < 8; e++) Bs[r][c8 + e] = (n < N && k + e < K) ? w[n * K + k + e] : zero;
            }
        }
        __syncwarp();
#pragma unroll
        for (uint32_t kk = 0; kk < WBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
            wmma::load_matrix_sync(a, &As[0][kk], WBK + WPAD);
            wmma::load_matrix_sync(b, &Bs[0][kk], WBK + WPAD);
            wmma::mma_sync(c, a, b, c);
        }
        __syncwarp();
    }
    wmma::store_matrix_sync(&Cs[0][0], c, 16 + 4, wmma::mem_row_major);
    __syncwarp();
    for (uint32_t e = lane; e < 256; e += 32) {
        const uint32_t r = e / 16, cc = e % 16;
        const size_t m = m0 + r, n = n0 + cc;
        if (m < M && n < N) y[m * N + n] = __float2bfloat16(Cs[r][cc]);
    }
}

// One block per query row (b, h, i); dynamic shared memory: Tk scores + 32 floats of scratch.
// q [B, H, Tq, Dh], k, v [B, G, Tk, Dh], visible [B, Tq, Tk] (1 = visible), out [B, H, Tq, Dh].
// A score is one warp's: lane l sums d = l, l + 32, ... (fmaf, ascending), a fixed xor butterfly
// adds the lanes, lane 0's total is the score. Then the max (exact in any order), the
// exponentials, their sum in ascending key order (one thread), p_j = e_j / z, and per d the
// sum of p_j v_j[d] in ascending key order.
extern "C" __global__ void inv_attention_f32(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const uint8_t* __restrict__ visible,
                                             float* __restrict__ out, uint32_t H, uint32_t G, uint32_t Tq,
                                             uint32_t Tk, uint32_t Dh, float scale) {
    extern __shared__ float sh[];
    float* s = sh;          // [Tk]
    float* red = sh + Tk;   // [32]
    const size_t row = blockIdx.x;
    const uint32_t i = row % Tq;
    const uint32_t h = (row / Tq) % H;
    const size_t b = row / ((size_t)Tq * H);
    const uint32_t g = h / (H / G);
    const float* qv = q + row * Dh;
    const float* kb = k + (b * G + g) * (size_t)Tk * Dh;
    const float* vb = v + (b * G + g) * (size_t)Tk * Dh;
    const uint8_t* mask = visible + (b * Tq + i) * (size_t)Tk;
    float* o = out + row * Dh;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;

    // 1. scores of the visible keys (a warp per key), and the largest
    float mx = -INFINITY;
    for (uint32_t j = warp; j < Tk; j += nwarps) {
        if (!mask[j]) continue;  // the same j across the warp
        const float* kj = kb + (size_t)j * Dh;
        float acc = 0.0f;
        for (uint32_t d = lane; d < Dh; d += 32) acc = fmaf(qv[d], kj[d], acc);
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        const float sj = __shfl_sync(0xffffffffu, acc, 0) * scale;
        if (lane == 0) s[j] = sj;
        mx = fmaxf(mx, sj);
    }
    // max is exact in any order
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = -INFINITY;
        for (uint32_t w = 0; w < nwarps; w++) m = fmaxf(m, red[w]);
        red[0] = m;
    }
    __syncthreads();
    mx = red[0];
    if (mx == -INFINITY) {  // no visible key: zeros, as on the CPU
        for (uint32_t d = threadIdx.x; d < Dh; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    // 2. exponentials, then their sum in ascending key order (one thread), then p_j = e_j / z
    for (uint32_t j = threadIdx.x; j < Tk; j += blockDim.x)
        if (mask[j]) s[j] = expf(s[j] - mx);
    __syncthreads();
    if (threadIdx.x == 0) {
        float z = 0.0f;
        for (uint32_t j = 0; j < Tk; j++)
            if (mask[j]) z += s[j];
        red[1] = z;
    }
    __syncthreads();
    const float z = red[1];
    for (uint32_t j = threadIdx.x; j < Tk; j += blockDim.x)
        if (mask[j]) s[j] = s[j] / z;
    __syncthreads();
    // 3. out[d] = sum_j p_j v_j[d], keys ascending
    for (uint32_t d = threadIdx.x; d < Dh; d += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t j = 0; j < Tk; j++)
            if (mask[j]) acc = fmaf(s[j], vb[(size_t)j * Dh + d], acc);
        o[d] = acc;
    }
}
