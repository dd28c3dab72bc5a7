// Gumbel-max sampling on the device (crate::gumbel defines it; this is the same formula in the
// same f64 precision): row r's token = argmax_i x[r, i] / T_r - log(-log(u(key_r, i))), ties to
// the lower index, NaN never chosen, no finite score -> token 0. One block of 1024 threads per
// row strides over the vocabulary, then reduces (score, index) pairs in shared memory.

#include <stdint.h>

#define SAMPLE_THREADS 1024

__device__ __forceinline__ uint64_t sm_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// whether (s, i) beats (best, at): larger score, or equal score and lower index
__device__ __forceinline__ bool sm_better(double s, uint32_t i, double best, uint32_t at) {
    return s > best || (s == best && i < at);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) gumbel_argmax_f32(const float* __restrict__ logits, uint32_t V,
                                                                               const uint64_t* __restrict__ keys,
                                                                               const float* __restrict__ temps,
                                                                               uint32_t* __restrict__ out) {
    __shared__ double s_best[SAMPLE_THREADS];
    __shared__ uint32_t s_at[SAMPLE_THREADS];
    const uint32_t row = blockIdx.x, tid = threadIdx.x;
    const float* x = logits + (size_t)row * V;
    const uint64_t key = keys[row];
    const double t = (double)temps[row];
    double best = -INFINITY;
    uint32_t at = 0xffffffffu;
    for (uint32_t i = tid; i < V; i += SAMPLE_THREADS) {
        const uint64_t h = sm_mix(key ^ ((uint64_t)i * 0x9E3779B97F4A7C15ull));
        const double u = ((double)(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
        const double s = (double)x[i] / t - log(-log(u));
        if (sm_better(s, i, best, at)) {
            best = s;
            at = i;
        }
    }
    s_best[tid] = best;
    s_at[tid] = at;
    __syncthreads();
    for (uint32_t half = SAMPLE_THREADS / 2; half > 0; half >>= 1) {
        if (tid < half && sm_better(s_best[tid + half], s_at[tid + half], s_best[tid], s_at[tid])) {
            s_best[tid] = s_best[tid + half];
            s_at[tid] = s_at[tid + half];
        }
        __syncthreads();
    }
    if (tid == 0) out[row] = s_at[0] == 0xffffffffu ? 0u : s_at[0];
}
