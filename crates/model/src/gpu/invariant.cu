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
    uint32_t* row0 = sh;       // [E] the counts, then the first row of each expert
    uint32_t* tile0 = sh + E;  // [E] first tile of each expert
    __shared__ uint32_t total;
    for (uint32_t e = threadIdx.x; e < E; e += blockDim.x) row0[e] = counts[e];
    __syncthreads();
    // the first warp scans: lane l sums its run of ceil(E / 32) experts, an exclusive shuffle scan
    // over the lanes gives each run's start, then the lane writes its experts' starts (integers:
    // the same table in any order of summation)
    if (threadIdx.x < 32) {
        const uint32_t lane = threadIdx.x, per = (E + 31) / 32, a = min(E, lane * per), b = min(E, a + per);
        uint32_t r = 0, t = 0;
        for (uint32_t e = a; e < b; ++e) {
            r += row0[e];
            t += (row0[e] + tile_rows - 1) / tile_rows;
        }
        uint32_t ri = r, ti = t;
#pragma unroll
        for (uint32_t o = 1; o < 32; o <<= 1) {
            const uint32_t ru = __shfl_up_sync(0xffffffffu, ri, o), tu = __shfl_up_sync(0xffffffffu, ti, o);
            if (lane >= o) {
                ri += ru;
                ti += tu;
            }
        }
        if (lane == 31) total = min(ti, max_tiles);
        uint32_t rx = ri - r, tx = ti - t;
        for (uint32_t e = a; e < b; ++e) {
            const uint32_t c = row0[e];
            row0[e] = rx;
            tile0[e] = tx;
            rx += c;
            tx += (c + tile_rows - 1) / tile_rows;
        }
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

// the thin (decode) and tensor-core (training / prefill) bf16 products
#include "invariant_mma.cuh"
