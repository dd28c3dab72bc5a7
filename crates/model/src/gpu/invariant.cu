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
//   ascending, f32 accumulation); the skinny variant is one warp per 16 x 16 tile, the thin ones
//   (decode) a warp per 8 columns streaming the weights, the _tc ones (training, prefill) 128 x
//   128 tiles through a cp.async pipeline.
// (The attention is paged.cu's variable-length kernel.)

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

// Grouped products for the MoE experts: x [A, K] holds each expert's rows back to back
// (expert e's rows start at row_start[e]), w [E, N, K]; y[a, n] = sum_k x[a, k] w[e(a), n, k].
// One launch for every expert: blockIdx.y walks a tile table (expert, first row, rows) whose
// tiles never span two experts. Each element takes exactly the operations of the single-expert
// kernels above (the skinny variants: the same fixed K order), so a row's bits depend only on
// its own data and its expert's weights, never on the other experts' rows.
extern "C" __global__ void __launch_bounds__(32) inv_grouped_nt_bf16(const __nv_bfloat16* __restrict__ x,
                                                                     const __nv_bfloat16* __restrict__ w,
                                                                     __nv_bfloat16* __restrict__ y,
                                                                     const uint32_t* __restrict__ tiles, uint32_t N,
                                                                     uint32_t K) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 As[16][WBK + WPAD];
    __shared__ __align__(32) __nv_bfloat16 Bs[16][WBK + WPAD];
    __shared__ __align__(32) float Cs[16][16 + 4];
    const uint32_t lane = threadIdx.x;
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    if (rows == 0) return;  // an unused entry of a device-built table (moe_tiles)
    const __nv_bfloat16* we = w + (size_t)e * N * K;
    const size_t n0 = (size_t)blockIdx.x * 16;
    const bool vec = (K % 8 == 0) && ((uintptr_t)x % 16 == 0) && ((uintptr_t)w % 16 == 0);
    const __nv_bfloat16 zero = __float2bfloat16(0.0f);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    for (uint32_t k0 = 0; k0 < K; k0 += WBK) {
        for (uint32_t v = lane; v < 16 * WBK / 8; v += 32) {
            const uint32_t r = v / (WBK / 8), c8 = (v % (WBK / 8)) * 8;
            const size_t k = k0 + c8, m = (size_t)m0 + r, n = n0 + r;
            const bool mok = r < rows;
            if (vec && mok && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&As[r][c8]) = *reinterpret_cast<const uint4*>(&x[m * K + k]);
            } else {
                for (int q = 0; q < 8; q++) As[r][c8 + q] = (mok && k + q < K) ? x[m * K + k + q] : zero;
            }
            if (vec && n < N && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&Bs[r][c8]) = *reinterpret_cast<const uint4*>(&we[n * K + k]);
            } else {
                for (int q = 0; q < 8; q++) Bs[r][c8 + q] = (n < N && k + q < K) ? we[n * K + k + q] : zero;
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
    for (uint32_t q = lane; q < 256; q += 32) {
        const uint32_t r = q / 16, cc = q % 16;
        const size_t n = n0 + cc;
        if (r < rows && n < N) y[((size_t)m0 + r) * N + n] = __float2bfloat16(Cs[r][cc]);
    }
}

// The grouped product with inv_matmul_nt_bf16's 64 x 64 tiles (4 warps of 32 x 32), for experts
// with many rows (training, prefill): a tile table entry (expert, first row, rows <= 64) per
// block row. The same mma sequence per element as every other bf16 kernel here, so the same bits
// as the skinny grouped kernel: which one runs depends on the batch, a row's bits never do.
extern "C" __global__ void __launch_bounds__(128) inv_grouped_nt_bf16_big(const __nv_bfloat16* __restrict__ x,
                                                                         const __nv_bfloat16* __restrict__ w,
                                                                         __nv_bfloat16* __restrict__ y,
                                                                         const uint32_t* __restrict__ tiles, uint32_t N,
                                                                         uint32_t K) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 As[WBM][WBK + WPAD];
    __shared__ __align__(32) __nv_bfloat16 Bs[WBN][WBK + WPAD];
    __shared__ __align__(32) float Cs[WBM][WBN + 4];
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    if (rows == 0) return;  // an unused entry of a device-built table (moe_tiles)
    const __nv_bfloat16* we = w + (size_t)e * N * K;
    const uint32_t tid = threadIdx.x, warp = tid / 32;
    const size_t n0 = (size_t)blockIdx.x * WBN;
    const uint32_t wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const bool vec = (K % 8 == 0) && ((uintptr_t)x % 16 == 0) && ((uintptr_t)w % 16 == 0);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0.0f);
    const __nv_bfloat16 zero = __float2bfloat16(0.0f);
    for (uint32_t k0 = 0; k0 < K; k0 += WBK) {
        for (uint32_t v = tid; v < WBM * WBK / 8; v += 128) {
            const uint32_t r = v / (WBK / 8), c8 = (v % (WBK / 8)) * 8;
            const size_t k = k0 + c8;
            const size_t m = (size_t)m0 + r, n = n0 + r;
            const bool mok = r < rows;
            if (vec && mok && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&As[r][c8]) = *reinterpret_cast<const uint4*>(&x[m * K + k]);
            } else {
                for (int q = 0; q < 8; q++) As[r][c8 + q] = (mok && k + q < K) ? x[m * K + k + q] : zero;
            }
            if (vec && n < N && k + 8 <= K) {
                *reinterpret_cast<uint4*>(&Bs[r][c8]) = *reinterpret_cast<const uint4*>(&we[n * K + k]);
            } else {
                for (int q = 0; q < 8; q++) Bs[r][c8 + q] = (n < N && k + q < K) ? we[n * K + k + q] : zero;
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
    for (uint32_t q = tid; q < WBM * WBN; q += 128) {
        const uint32_t r = q / WBN, cc = q % WBN;
        const size_t n = n0 + cc;
        if (r < rows && n < N) y[((size_t)m0 + r) * N + n] = __float2bfloat16(Cs[r][cc]);
    }
}

// f32: the skinny f32 kernel's tile (8 rows x 16 columns, one output per thread, K staged 32 at a
// time, one fmaf chain over ascending k), per expert tile.
extern "C" __global__ void __launch_bounds__(128) inv_grouped_nt_f32(const float* __restrict__ x,
                                                                     const float* __restrict__ w,
                                                                     float* __restrict__ y,
                                                                     const uint32_t* __restrict__ tiles, uint32_t N,
                                                                     uint32_t K) {
    __shared__ float xs[SM_ROWS][SK_STEP + 1];
    __shared__ float ws[SN_COLS][SK_STEP + 1];
    const uint32_t tid = threadIdx.x, r = tid / SN_COLS, c = tid % SN_COLS;
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    if (rows == 0) return;  // an unused entry of a device-built table (moe_tiles)
    const float* we = w + (size_t)e * N * K;
    const size_t n0 = (size_t)blockIdx.x * SN_COLS;
    float acc = 0.0f;
    for (uint32_t k0 = 0; k0 < K; k0 += SK_STEP) {
        for (uint32_t q = tid; q < SM_ROWS * SK_STEP; q += 128) {
            const uint32_t rr = q / SK_STEP, cc = q % SK_STEP;
            const size_t k = k0 + cc;
            xs[rr][cc] = (rr < rows && k < K) ? x[((size_t)m0 + rr) * K + k] : 0.0f;
        }
        for (uint32_t q = tid; q < SN_COLS * SK_STEP; q += 128) {
            const uint32_t rr = q / SK_STEP, cc = q % SK_STEP;
            const size_t n = n0 + rr, k = k0 + cc;
            ws[rr][cc] = (n < N && k < K) ? we[n * K + k] : 0.0f;
        }
        __syncthreads();
        const uint32_t kmax = min((uint32_t)SK_STEP, K - k0);
        for (uint32_t kk = 0; kk < kmax; kk++) acc = fmaf(xs[r][kk], ws[c][kk], acc);
        __syncthreads();
    }
    const size_t n = n0 + c;
    if (r < rows && n < N) y[((size_t)m0 + r) * N + n] = acc;
}

// The grouped products' tile table built on the device from the experts' row counts (so the
// counts never travel to the host): expert e's rows start at the sum of the counts before it
// and are cut into tiles of `tile_rows` (the last one shorter), experts in order — the table
// `grouped_nt` builds on the host. Entries past the last tile get rows = 0 (the kernels skip
// them), up to `max_tiles` (>= sum_e ceil(counts[e] / tile_rows)). One block; dynamic shared
// memory of 2 E words.
extern "C" __global__ void moe_tiles(const uint32_t* __restrict__ counts, uint32_t E, uint32_t tile_rows, uint32_t max_tiles,
                                     uint32_t* __restrict__ tiles) {
    extern __shared__ uint32_t sh[];
    uint32_t* row0 = sh;       // [E] first row of each expert
    uint32_t* tile0 = sh + E;  // [E] first tile of each expert
    __shared__ uint32_t total;
    if (threadIdx.x == 0) {
        uint32_t r = 0, t = 0;
        for (uint32_t e = 0; e < E; ++e) {
            row0[e] = r;
            tile0[e] = t;
            r += counts[e];
            t += (counts[e] + tile_rows - 1) / tile_rows;
        }
        total = min(t, max_tiles);
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < E; e += blockDim.x) {
        const uint32_t c = counts[e];
        for (uint32_t q = 0; q * tile_rows < c; ++q) {
            const uint32_t t = tile0[e] + q;
            if (t >= max_tiles) break;
            tiles[3 * t] = e;
            tiles[3 * t + 1] = row0[e] + q * tile_rows;
            tiles[3 * t + 2] = min(tile_rows, c - q * tile_rows);
        }
    }
    for (uint32_t t = total + threadIdx.x; t < max_tiles; t += blockDim.x) {
        tiles[3 * t] = 0;
        tiles[3 * t + 1] = 0;
        tiles[3 * t + 2] = 0;
    }
}

// Thin products (few rows: decode), bf16: a warp per 8 output columns and every 16-row m-tile
// of its rows (MT of them), the weights streamed straight from global memory (8 K steps of
// loads in flight), 4 warps a block — many warps, so the weight read runs at memory speed. Per
// element the same chain as every bf16 kernel above: mma over 16-wide K steps ascending from 0
// (mma.m16n8k16 is the instruction a 16 x 16 x 16 wmma issues per 8 columns), over K rounded
// up to WBK with zeros, one f32 accumulator, rounded once — so the same bits as the others.
// Needs K % 16 == 0 and 4-byte aligned rows (the host checks).
#define THIN_WARPS 4
#define THIN_UNROLL 8
__device__ __forceinline__ void thin_mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t thin_ld(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// y[m0 + r, n0 + j] = Σ_k x[m0 + r, k] w[n0 + j, k] for r < rows (<= 16 MT), j < 8
template <int MT>
__device__ __forceinline__ void thin_tile(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                          __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t n0,
                                          uint32_t N, uint32_t K) {
    const uint32_t lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const uint32_t n = n0 + gid;
    const bool nok = n < N;
    const __nv_bfloat16* wr = w + (size_t)(nok ? n : 0) * K + 2 * tig;
    float c[MT][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[t][e] = 0.0f;
    const uint32_t ksteps = K / 16, steps = (K + WBK - 1) / WBK * (WBK / 16);
    for (uint32_t s0 = 0; s0 < steps; s0 += THIN_UNROLL) {
        uint32_t b[THIN_UNROLL][2];
#pragma unroll
        for (int u = 0; u < THIN_UNROLL; u++) {
            const uint32_t s = s0 + u;
            const bool in = nok && s < ksteps;
            b[u][0] = in ? thin_ld(wr + s * 16) : 0u;
            b[u][1] = in ? thin_ld(wr + s * 16 + 8) : 0u;
        }
#pragma unroll
        for (int u = 0; u < THIN_UNROLL; u++) {
            const uint32_t s = s0 + u;
            if (s >= steps) break;
            const bool kin = s < ksteps;
#pragma unroll
            for (int t = 0; t < MT; t++) {
                const uint32_t r0 = t * 16 + gid, r1 = r0 + 8;
                const bool ok0 = kin && r0 < rows, ok1 = kin && r1 < rows;
                const __nv_bfloat16* x0 = x + (size_t)(m0 + (ok0 ? r0 : 0)) * K + s * 16 + 2 * tig;
                const __nv_bfloat16* x1 = x + (size_t)(m0 + (ok1 ? r1 : 0)) * K + s * 16 + 2 * tig;
                const uint32_t a[4] = {ok0 ? thin_ld(x0) : 0u, ok1 ? thin_ld(x1) : 0u, ok0 ? thin_ld(x0 + 8) : 0u,
                                       ok1 ? thin_ld(x1 + 8) : 0u};
                thin_mma(c[t], a, b[u]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const uint32_t r = t * 16 + gid + 8 * (e >> 1), col = n0 + 2 * tig + (e & 1);
            if (r < rows && col < N) y[(size_t)(m0 + r) * N + col] = __float2bfloat16(c[t][e]);
        }
}

#define THIN_DENSE(MT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * THIN_WARPS) inv_matmul_nt_bf16_thin##MT(                  \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, \
        uint32_t M, uint32_t N, uint32_t K) {                                                                   \
        const uint32_t n0 = (blockIdx.x * THIN_WARPS + (threadIdx.x >> 5)) * 8, m0 = blockIdx.y * 16 * MT;      \
        if (n0 >= N || m0 >= M) return;                                                                         \
        thin_tile<MT>(x, w, y, m0, min(M - m0, 16u * MT), n0, N, K);                                            \
    }
THIN_DENSE(1)

// The grouped product's thin variant: tile table entries (expert, first row, rows <= 16) as for
// inv_grouped_nt_bf16, a warp per 8 columns of the expert's weights.
extern "C" __global__ void __launch_bounds__(32 * THIN_WARPS) inv_grouped_nt_bf16_thin(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
    const uint32_t* __restrict__ tiles, uint32_t N, uint32_t K) {
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    const uint32_t n0 = (blockIdx.x * THIN_WARPS + (threadIdx.x >> 5)) * 8;
    if (rows == 0 || n0 >= N) return;
    thin_tile<1>(x, w + (size_t)e * N * K, y, m0, rows, n0, N, K);
}

// The tensor-core products at training / prefill sizes: a 128 x 128 output tile a block (4 warps
// of 64 x 64), K staged 32 at a time through a 4-stage cp.async pipeline in shared memory
// (16-byte chunks XOR-swizzled so the ldmatrix reads are free of bank conflicts), operands read
// by ldmatrix.x4 (x rows give the row-major A fragment, w rows — K contiguous — the col-major B
// fragment), mma.m16n8k16 with f32 accumulators, bf16 stored straight from the registers.
// Per element the same chain as every bf16 kernel above: the accumulator starts at 0, one mma
// (thin_mma, the very instruction) per 16-wide K step ascending from k = 0, over K rounded up to
// WBK = 32 with zeros (ceil(K / 32) * 2 steps; cp.async's zero fill writes the k >= K chunks and
// the rows / columns out of range), rounded once (__float2bfloat16). The pipeline, the warp
// layout and the fragment loads only decide when and where the operands arrive, never which
// mma a product goes into, so the bits equal the 64 x 64, 16 x 16 and thin kernels'.
// Needs K % 8 == 0 and 16-byte aligned x and w (every row then starts on a 16-byte boundary;
// the host checks K and the start offsets, allocations being 256-byte aligned). Dynamic shared
// memory of TC_SMEM bytes (64 KiB: the host raises the function's limit); 236 registers, so two
// blocks an SM. (Measured on an H200: M4096 N2048 K2048 ~400 TFLOP/s; TC_BK = 64 — the code
// allows it, skipping the K steps past 2 ceil(K / 32) — and 8-warp 128 x 256 / 256 x 128 tiles
// or 3 / 5 stages were slower or no faster.)
#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 4
#define TC_WARPS_M 2
#define TC_WARPS_N 2
#define TC_THREADS (32 * TC_WARPS_M * TC_WARPS_N)
#define TC_A_BYTES (TC_BM * TC_BK * 2)
#define TC_B_BYTES (TC_BN * TC_BK * 2)
#define TC_STAGE_BYTES (TC_A_BYTES + TC_B_BYTES)
#define TC_SMEM (TC_STAGES * TC_STAGE_BYTES)

__device__ __forceinline__ void tc_cp16(uint32_t dst, const void* src, bool valid) {
    // src-size 0: no bytes read, the 16 destination bytes zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void tc_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void tc_ldsm4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The swizzled chunk of 16-byte chunk c in smem row r (rows of TC_BK bf16 = TC_BK / 8 chunks):
// the 8 consecutive rows one ldmatrix phase reads, or one loader pass writes, land in 8 distinct
// 16-byte bank groups (rows of 64 bytes: two rows a 128-byte bank line; of 128 bytes: one).
__device__ __forceinline__ uint32_t tc_swz(uint32_t r, uint32_t c) {
    return TC_BK == 32 ? c ^ ((r >> 1) & 3) : c ^ (r & 7);
}

// y[m0 + r, n] = Σ_k x[m0 + r, k] w[n, k] for r < rows (<= TC_BM) and the block's TC_BN columns n < N
__device__ __forceinline__ void tc_tile(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                        __nv_bfloat16* __restrict__ y, uint32_t m0, uint32_t rows, uint32_t N,
                                        uint32_t K) {
    constexpr uint32_t WM = TC_BM / TC_WARPS_M, WN = TC_BN / TC_WARPS_N, MI = WM / 16, NI = WN / 8;
    constexpr uint32_t CH = TC_BK / 8, ROW_BYTES = TC_BK * 2, KK = TC_BK / 16;  // chunks a row, K steps a stage
    constexpr uint32_t ROW_STEP = TC_THREADS / CH;  // rows of a tile one pass of the loader covers
    constexpr uint32_t A_ITERS = TC_BM / ROW_STEP, B_ITERS = TC_BN / ROW_STEP;
    static_assert(TC_BK == 32 || TC_BK == 64, "a stage holds 2 or 4 K steps");
    static_assert(WM % 16 == 0 && WN % 16 == 0 && TC_BM % ROW_STEP == 0 && TC_BN % ROW_STEP == 0, "tile shape");
    static_assert(ROW_STEP % 8 == 0, "the swizzle of a loader row must not depend on its pass");
    extern __shared__ __align__(128) uint8_t tc_smem[];
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t n0 = blockIdx.x * TC_BN;
    const uint32_t wm = (warp / TC_WARPS_N) * WM, wn = (warp % TC_WARPS_N) * WN;
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(tc_smem);
    // a stage: A [TC_BM][TC_BK] then B [TC_BN][TC_BK] bf16, chunks swizzled by tc_swz

    // loader: thread tid copies chunk (tid % CH) of rows tid / CH + ROW_STEP i of A and of B
    const uint32_t lrow = tid / CH, lch = tid % CH;
    const uint32_t soff = lrow * ROW_BYTES + (tc_swz(lrow, lch) << 4);
    const __nv_bfloat16* xa = x + (size_t)(m0 + lrow) * K + lch * 8;
    const __nv_bfloat16* wb = w + (size_t)(n0 + lrow) * K + lch * 8;
    const size_t pass = (size_t)ROW_STEP * K;
    auto load = [&](uint32_t kt, uint32_t st) {
        const uint32_t k = kt * TC_BK;
        const bool kok = k + lch * 8 < K;  // K % 8 == 0: a chunk is all in or all out
        const uint32_t sa = sbase + st * TC_STAGE_BYTES + soff, sb = sa + TC_A_BYTES;
#pragma unroll
        for (uint32_t i = 0; i < A_ITERS; i++) {
            const bool ok = kok && lrow + ROW_STEP * i < rows;
            tc_cp16(sa + i * ROW_STEP * ROW_BYTES, ok ? xa + i * pass + k : x, ok);
        }
#pragma unroll
        for (uint32_t i = 0; i < B_ITERS; i++) {
            const bool ok = kok && n0 + lrow + ROW_STEP * i < N;
            tc_cp16(sb + i * ROW_STEP * ROW_BYTES, ok ? wb + i * pass + k : w, ok);
        }
    };

    // ldmatrix lane addresses (byte offsets in a stage) for the KK 16-wide K steps of a stage.
    // A (m16 x k16 per x4): lane l gives row (l & 15), k chunk (l >> 4) -> a0..a3 of mma.m16n8k16.
    // B (two n8 x k16 per x4): lane l gives n row (l & 7) + 8 (l >> 4), k chunk (l >> 3) & 1 ->
    // {b0, b1} of the first n8 tile, then of the second. Rows start at multiples of 16 (wm, wn,
    // 16 mi, 16 p), so the swizzle of a lane's row depends on (l & 7) only.
    uint32_t aoff[KK], boff[KK];
#pragma unroll
    for (uint32_t kk = 0; kk < KK; kk++) {
        const uint32_t ar = lane & 15, br = (lane & 7) + ((lane >> 4) << 3);
        aoff[kk] = (wm + ar) * ROW_BYTES + (tc_swz(ar, 2 * kk + (lane >> 4)) << 4);
        boff[kk] = TC_A_BYTES + (wn + br) * ROW_BYTES + (tc_swz(br, 2 * kk + ((lane >> 3) & 1)) << 4);
    }
    uint32_t af[2][MI][4], bfr[2][NI][2];
    auto frags = [&](uint32_t buf, uint32_t st, uint32_t kk) {
        const uint32_t base = sbase + st * TC_STAGE_BYTES;
#pragma unroll
        for (uint32_t mi = 0; mi < MI; mi++) tc_ldsm4(af[buf][mi], base + aoff[kk] + mi * 16 * ROW_BYTES);
#pragma unroll
        for (uint32_t p = 0; p < NI / 2; p++) {
            uint32_t r[4];
            tc_ldsm4(r, base + boff[kk] + p * 16 * ROW_BYTES);
            bfr[buf][2 * p][0] = r[0];
            bfr[buf][2 * p][1] = r[1];
            bfr[buf][2 * p + 1][0] = r[2];
            bfr[buf][2 * p + 1][1] = r[3];
        }
    };
    float acc[MI][NI][4];
#pragma unroll
    for (uint32_t mi = 0; mi < MI; mi++)
#pragma unroll
        for (uint32_t ni = 0; ni < NI; ni++)
#pragma unroll
            for (uint32_t e = 0; e < 4; e++) acc[mi][ni][e] = 0.0f;
    auto mmas = [&](uint32_t buf) {
#pragma unroll
        for (uint32_t mi = 0; mi < MI; mi++)
#pragma unroll
            for (uint32_t ni = 0; ni < NI; ni++) thin_mma(acc[mi][ni], af[buf][mi], bfr[buf][ni]);
    };

    // tile kt of K lives in stage kt % TC_STAGES. Before the body of iteration kt, tiles up to kt
    // have landed (wait + barrier); it issues tile kt + STAGES - 1 into the stage every warp
    // finished reading before the previous barrier, and reads stage kt: each K step's fragments
    // are loaded during the step before (the first of the next stage after the next barrier).
    // One commit per tile slot (empty groups past the end) keeps wait_group exact. The K steps:
    // 2 ceil(K / 32) of them, s = KK kt + kk; with TC_BK = 64 the last tile's upper half is
    // skipped when it lies wholly past that count (it would add steps the other kernels lack).
    const uint32_t ktiles = (K + TC_BK - 1) / TC_BK, steps = (K + WBK - 1) / WBK * (WBK / 16);
#pragma unroll
    for (uint32_t s = 0; s < TC_STAGES - 1; s++) {
        if (s < ktiles) load(s, s);
        tc_commit();
    }
    tc_wait<TC_STAGES - 2>();
    __syncthreads();
    frags(0, 0, 0);
    uint32_t rs = 0, ws = TC_STAGES - 1;
    for (uint32_t kt = 0; kt < ktiles; kt++) {
#pragma unroll
        for (uint32_t kk = 0; kk < KK; kk++) {
            if (kk + 1 < KK) {
                frags((kk + 1) & 1, rs, kk + 1);
            } else {
                tc_wait<TC_STAGES - 2>();
                __syncthreads();
                rs = rs + 1 == TC_STAGES ? 0 : rs + 1;
                frags((kk + 1) & 1, rs, 0);  // (past the last tile: a stale stage, never used)
            }
            if (kk == 0) {
                if (kt + TC_STAGES - 1 < ktiles) load(kt + TC_STAGES - 1, ws);
                tc_commit();
                ws = ws + 1 == TC_STAGES ? 0 : ws + 1;
            }
            if (KK == 2 || kt * KK + kk < steps) mmas(kk & 1);  // K step KK kt + kk
        }
    }

    // epilogue: c0, c1 at (row gid, columns 2 tig, 2 tig + 1), c2, c3 at row gid + 8
    const uint32_t gid = lane >> 2, tig = lane & 3;
    const bool pairs = (N & 1) == 0;  // then an even column's pair is 4-byte aligned in y
#pragma unroll
    for (uint32_t mi = 0; mi < MI; mi++)
#pragma unroll
        for (uint32_t h = 0; h < 2; h++) {
            const uint32_t r = wm + mi * 16 + gid + 8 * h;
            if (r >= rows) continue;
            __nv_bfloat16* yr = y + (size_t)(m0 + r) * N;
#pragma unroll
            for (uint32_t ni = 0; ni < NI; ni++) {
                const uint32_t col = n0 + wn + ni * 8 + 2 * tig;
                const __nv_bfloat16 v0 = __float2bfloat16(acc[mi][ni][2 * h]), v1 = __float2bfloat16(acc[mi][ni][2 * h + 1]);
                if (pairs && col + 1 < N) {
                    __nv_bfloat162 v;
                    v.x = v0;
                    v.y = v1;
                    *reinterpret_cast<__nv_bfloat162*>(yr + col) = v;
                } else {
                    if (col < N) yr[col] = v0;
                    if (col + 1 < N) yr[col + 1] = v1;
                }
            }
        }
}

extern "C" __global__ void __launch_bounds__(TC_THREADS) inv_matmul_nt_bf16_tc(const __nv_bfloat16* __restrict__ x,
                                                                                const __nv_bfloat16* __restrict__ w,
                                                                                __nv_bfloat16* __restrict__ y,
                                                                                uint32_t M, uint32_t N, uint32_t K) {
    const uint32_t m0 = blockIdx.y * TC_BM;
    if (m0 >= M) return;
    tc_tile(x, w, y, m0, min(M - m0, (uint32_t)TC_BM), N, K);
}

// The grouped product on the same tiles: tile table entries (expert, first row, rows <= TC_BM)
// as for inv_grouped_nt_bf16_big, expert e's weights at w + e N K.
extern "C" __global__ void __launch_bounds__(TC_THREADS) inv_grouped_nt_bf16_tc(const __nv_bfloat16* __restrict__ x,
                                                                                 const __nv_bfloat16* __restrict__ w,
                                                                                 __nv_bfloat16* __restrict__ y,
                                                                                 const uint32_t* __restrict__ tiles,
                                                                                 uint32_t N, uint32_t K) {
    const uint32_t e = tiles[3 * blockIdx.y], m0 = tiles[3 * blockIdx.y + 1], rows = tiles[3 * blockIdx.y + 2];
    if (rows == 0) return;  // an unused entry of a device-built table (moe_tiles)
    tc_tile(x, w + (size_t)e * N * K, y, m0, min(rows, (uint32_t)TC_BM), N, K);
}
