// kbench: the batch-invariant bf16 products at decode sizes, timed by CUDA events, candidates
// (thin_next.cuh) checked bitwise against the kernels in crates/model/src/gpu/invariant_mma.cuh.
// Built on the CPU machine by scripts/cuda/kbench/build.sh, run by scripts/cuda/kbench/run.sh.
// Weights are cycled over copies totalling >= 512 MB so every launch reads them from HBM, as a
// decode step does (a layer's weights are long evicted by the time it comes round again).
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <algorithm>
#include <functional>
#include "invariant.cu"
#include "thin_next.cuh"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        p[i] = __float2bfloat16(((float)(z >> 40) / (float)(1ull << 24) * 2.0f - 1.0f) * scale);
    }
}

typedef void (*DenseK)(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, uint32_t, uint32_t, uint32_t);
typedef void (*GroupedK)(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, const uint32_t*, uint32_t, uint32_t);

struct DenseV { const char* name; DenseK k; int rows_per_block; int cols_per_block; int smem; int max_m; };

static float time_it(int reps, const std::function<void(int)>& f) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++) f(i);
    CK(cudaEventRecord(a));
    for (int i = 0; i < reps; i++) f(i);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaGetLastError());
    return ms / reps;
}

static std::vector<uint16_t> host(const __nv_bfloat16* d, size_t n) {
    std::vector<uint16_t> h(n);
    CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
    return h;
}

int main(int argc, char** argv) {
    const size_t cycle_bytes = 512ull << 20;
    const int reps = 50;
    printf("case,kernel,us,weight_GBps,bitwise\n");
    // ---- dense: (name, N, K) at M rows
    struct Shape { const char* what; uint32_t N, K; };
    std::vector<Shape> shapes = {{"q", 4096, 2048}, {"kv", 512, 2048}, {"o", 2048, 4096}, {"router", 128, 2048}, {"qkv", 5120, 2048}, {"head", 151936, 2048}};
    std::vector<uint32_t> ms = {1, 4, 16, 32, 64, 128, 256};
    std::vector<DenseV> dv = {
        {"cur_thin", nullptr, 0, 32, 0, 64},
        {"smem_1_256", nx_dense_smem_1_256, 16, 32, 0, 16},
        {"prev_thin_s", nx_prev_thin_s, 16, 32, 0, 16},
        {"thin_l", inv_matmul_nt_bf16_thin_l, 16, 32, 0, 1 << 30},
        {"ldm_128_1", nx_dense_ldm_128_1, 16, 32, 0, 1 << 30},
        {"ldm_64_1", nx_dense_ldm_64_1, 16, 32, 0, 1 << 30},
        {"ldm_64_2", nx_dense_ldm_64_2, 32, 32, 0, 1 << 30},
        {"ldm_64_4", nx_dense_ldm_64_4, 64, 32, 0, 1 << 30},
        {"tc", inv_matmul_nt_bf16_tc, 128, 128, 4 * (128 + 128) * 32 * 2, 1 << 30},
    };
    CK(cudaFuncSetAttribute(inv_matmul_nt_bf16_tc, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * (128 + 128) * 32 * 2));
    DenseK cur[4] = {inv_matmul_nt_bf16_thin1, inv_matmul_nt_bf16_thin2, inv_matmul_nt_bf16_thin3, inv_matmul_nt_bf16_thin4};
    for (const Shape& sh : shapes) {
        const size_t wel = (size_t)sh.N * sh.K;
        const int copies = std::max<size_t>(1, cycle_bytes / (wel * 2));
        __nv_bfloat16 *w, *x, *y, *yref;
        CK(cudaMalloc(&w, wel * 2 * copies));
        CK(cudaMalloc(&x, (size_t)256 * sh.K * 2));
        CK(cudaMalloc(&y, (size_t)256 * sh.N * 2));
        CK(cudaMalloc(&yref, (size_t)256 * sh.N * 2));
        fill_bf16<<<1024, 256>>>(w, wel * copies, 1, 0.05f);
        fill_bf16<<<1024, 256>>>(x, (size_t)256 * sh.K, 2, 1.0f);
        for (uint32_t M : ms) {
            const int mt = std::min<int>(4, (M + 15) / 16);
            auto launch = [&](const DenseV& v, int i, __nv_bfloat16* out) {
                const __nv_bfloat16* wi = w + (size_t)(i % copies) * wel;
                DenseK k = v.k ? v.k : cur[mt - 1];
                const int rpb = v.k ? v.rows_per_block : 16 * mt;
                dim3 grid((sh.N + v.cols_per_block - 1) / v.cols_per_block, (M + rpb - 1) / rpb);
                k<<<grid, 128, v.smem>>>(x, wi, out, M, sh.N, sh.K);
            };
            launch(M <= 64 ? dv[0] : dv.back(), 0, yref);
            CK(cudaDeviceSynchronize());
            auto ref = host(yref, (size_t)M * sh.N);
            for (const DenseV& v : dv) {
                if ((int)M > v.max_m) continue;
                if (!strcmp(v.name, "tc") && M < 16) continue;
                CK(cudaMemset(y, 0xff, (size_t)256 * sh.N * 2));
                launch(v, 0, y);
                CK(cudaDeviceSynchronize());
                const bool same = host(y, (size_t)M * sh.N) == ref;
                const float t = time_it(reps, [&](int i) { launch(v, i, y); });
                printf("dense %s M%u N%u K%u,%s,%.2f,%.0f,%s\n", sh.what, M, sh.N, sh.K, v.name, t * 1e3, wel * 2 / (t * 1e-3) / 1e9, same ? "same" : "DIFF");
            }
        }
        CK(cudaFree(w)); CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(yref));
    }
    // ---- grouped: E experts, (N, K), assignments spread over experts (a fixed pseudo-random pick)
    struct GShape { const char* what; uint32_t N, K; };
    std::vector<GShape> gsh = {{"gate_up", 1536, 2048}, {"down", 2048, 768}};
    const uint32_t E = 128;
    std::vector<uint32_t> assigns = {8, 128, 512, 2048};
    struct GroupedV { const char* name; GroupedK k; };
    struct GroupedV2 { const char* name; GroupedK k; uint32_t tile_rows, cols; };
    std::vector<GroupedV2> gv = {{"cur_thin", inv_grouped_nt_bf16_thin, 16, 32}, {"cur_skinny", inv_grouped_nt_bf16, 16, 16}, {"pf_4", nx_grouped_pf_4, 16, 32}, {"pf_8", nx_grouped_pf_8, 16, 32}, {"pf_16", nx_grouped_pf_16, 16, 32}, {"smem_1", nx_grouped_smem_1, 16, 32}, {"smem_2", nx_grouped_smem_2, 32, 32}, {"s1_64", nx_grouped_s1_64, 16, 32}, {"s1_256", nx_grouped_s1_256, 16, 32}, {"s2_256", nx_grouped_s2_256, 32, 32}, {"prev_s2", nx_prev_grouped_thin_s2, 32, 32}, {"prod_l", inv_grouped_nt_bf16_thin_l, 16, 32}};
    for (const GShape& sh : gsh) {
        const size_t wel = (size_t)E * sh.N * sh.K;
        const int copies = std::max<size_t>(1, (2 * cycle_bytes) / (wel * 2));
        __nv_bfloat16 *w, *x, *y, *yref;
        uint32_t* tiles;
        CK(cudaMalloc(&w, wel * 2 * copies));
        CK(cudaMalloc(&x, (size_t)2048 * sh.K * 2));
        CK(cudaMalloc(&y, (size_t)2048 * sh.N * 2));
        CK(cudaMalloc(&yref, (size_t)2048 * sh.N * 2));
        CK(cudaMalloc(&tiles, (size_t)3 * 4 * (2048 + E)));
        fill_bf16<<<1024, 256>>>(w, wel * copies, 3, 0.05f);
        fill_bf16<<<1024, 256>>>(x, (size_t)2048 * sh.K, 4, 1.0f);
        for (uint32_t A : assigns) {
            std::vector<uint32_t> counts(E, 0);
            uint64_t z = 12345;
            for (uint32_t a = 0; a < A; a++) {
                z = z * 6364136223846793005ull + 1442695040888963407ull;
                counts[(A <= 8 ? a * 16 : (z >> 33)) % E]++;
            }
            uint32_t touched = 0, maxc = 0;
            for (uint32_t e = 0; e < E; e++) {
                touched += counts[e] > 0;
                maxc = std::max(maxc, counts[e]);
            }
            uint32_t nt = 0;
            auto table = [&](uint32_t tr) {
                std::vector<uint32_t> tab;
                uint32_t row = 0;
                for (uint32_t e = 0; e < E; e++) {
                    for (uint32_t q = 0; q * tr < counts[e]; q++) {
                        tab.push_back(e); tab.push_back(row + q * tr); tab.push_back(std::min(tr, counts[e] - q * tr));
                    }
                    row += counts[e];
                }
                nt = tab.size() / 3;
                CK(cudaMemcpy(tiles, tab.data(), tab.size() * 4, cudaMemcpyHostToDevice));
            };
            const double bytes = (double)touched * sh.N * sh.K * 2;
            auto launch = [&](const GroupedV2& v, int i, __nv_bfloat16* out) {
                dim3 grid((sh.N + v.cols - 1) / v.cols, nt);
                v.k<<<grid, v.cols == 16 ? 32 : 128>>>(x, w + (size_t)(i % copies) * wel, out, tiles, sh.N, sh.K);
            };
            table(16);
            launch(gv[0], 0, yref);
            CK(cudaDeviceSynchronize());
            auto ref = host(yref, (size_t)A * sh.N);
            for (const GroupedV2& v : gv) {
                table(v.tile_rows);
                CK(cudaMemset(y, 0xff, (size_t)2048 * sh.N * 2));
                launch(v, 0, y);
                CK(cudaDeviceSynchronize());
                const bool same = host(y, (size_t)A * sh.N) == ref;
                const float t = time_it(reps, [&](int i) { launch(v, i, y); });
                printf("grouped %s A%u touched%u max%u N%u K%u,%s,%.2f,%.0f,%s\n", sh.what, A, touched, maxc, sh.N, sh.K, v.name, t * 1e3, bytes / (t * 1e-3) / 1e9, same ? "same" : "DIFF");
            }
        }
        CK(cudaFree(w)); CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(yref)); CK(cudaFree(tiles));
    }
    return 0;
}
