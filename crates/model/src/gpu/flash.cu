// Tensor-core variable-length attention (bf16 storage, f32 arithmetic): the batch-invariant
// forward of crates/model/src/nn/varlen.rs for bf16 on CUDA (paged.cu keeps f32).
//
// Rows are (query, head) pairs: the R = H / G query heads that share kv head g, query after
// query, so a decode step's R heads fill one mma tile and read their kv head once (GQA shared).
// A block owns 64 consecutive rows of one sequence (its queries share a key list) and one kv
// head; 4 warps of 16 rows. Keys are taken in chunks of 64 from key 0 of the sequence (two
// shared-memory stages: a chunk's keys and values load by cp.async while the one before is
// computed, which changes no arithmetic):
//   s = (q · k) on tensor cores (mma m16n8k16, Dh in ascending 16-wide steps, f32 accumulators),
//   times scale; keys a row does not see are -inf;
//   m' = max(m, max_j s_j); p_j = exp(s_j - m'); z = z · e^(m - m') + Σ p_j (a fixed
//   thread-local order, then a fixed xor butterfly over the 4 lanes of the row);
//   o = o · e^(m - m') + P V (P rounded to bf16, mma over the chunk's keys in ascending 16-wide
//   steps); out = o / z.
// Every step for a row depends on its own q, its own keys and the chunk grid (fixed by key 0),
// never on the other rows of the tile, which block computes it or where the blocks of keys lie
// (an mma computes each element from its own row and column; a row's masked keys add exact
// zeros; chunks past a row's last key leave its state unchanged: e^0 = 1 and p = 0). So a decode
// step equals the trainer's packed forward bit for bit, at any length.

#include <cuda_bf16.h>
#include <stdint.h>

#define FT 128
#define KC 64
#define FROWS 64
#define PAD 8
static_assert(FROWS == FT / 32 * 16, "a block's rows are its warps' 16 rows each (flash.rs ROWS)");

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// two floats as bf16 in one register, the first in the low half (the lower column)
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack_bf(bf16 lo, bf16 hi) {
    const uint32_t l = *reinterpret_cast<const unsigned short*>(&lo);
    const uint32_t h = *reinterpret_cast<const unsigned short*>(&hi);
    return l | (h << 16);
}
__device__ __forceinline__ uint32_t ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// 16 bytes global -> shared, asynchronous; zero-filled (nothing read) when `in` is false
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(in ? 16 : 0) : "memory");
}

// bytes of one forward stage (a chunk's keys, then its values); the forward takes two
// (flash.rs fwd_smem mirrors it)
#define FLASH_STAGE(DH) (2 * KC * ((DH) + PAD) * 2)

// tiles[b] = (first query of the sequence, one past its last, first row r0 of the block, the most
// keys any of the block's queries sees)
template <int DH>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                          const uint32_t* __restrict__ table, const uint32_t* __restrict__ start,
                          const uint32_t* __restrict__ keys, const uint4* __restrict__ tiles, bf16* __restrict__ out,
                          float* __restrict__ lse, uint32_t H, uint32_t G, uint32_t bs, float scale) {
    // two stages of a chunk's keys and values (dynamic: flash_fwd_smem bytes) and their pool rows
    extern __shared__ __align__(16) unsigned char fsm[];
    typedef bf16 Row[DH + PAD];
    __shared__ uint32_t krow[2][KC];
    const uint4 t = tiles[blockIdx.x];
    const uint32_t qa = t.x, qb = t.y, r0 = t.z, maxk = t.w;
    const uint32_t g = blockIdx.y, R = H / G;
    const uint32_t nrows = (qb - qa) * R;
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const uint32_t* tab = table + start[qa];
    const uint32_t wr0 = r0 + warp * 16;
    const bool active = wr0 < nrows;
    bool ok[2];
    uint32_t nk[2];
    size_t qoff[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const uint32_t r = wr0 + gid + 8 * i;
        ok[i] = r < nrows;
        const uint32_t n = qa + (ok[i] ? r / R : 0), h = g * R + (ok[i] ? r % R : 0);
        nk[i] = ok[i] ? keys[n] : 0;
        qoff[i] = ((size_t)n * H + h) * DH;
    }
    uint32_t qf[DH / 16][4];
#pragma unroll
    for (int kd = 0; kd < DH / 16; kd++) {
        const int c = kd * 16 + 2 * tig;
        qf[kd][0] = ok[0] ? ld32(q + qoff[0] + c) : 0u;
        qf[kd][1] = ok[1] ? ld32(q + qoff[1] + c) : 0u;
        qf[kd][2] = ok[0] ? ld32(q + qoff[0] + c + 8) : 0u;
        qf[kd][3] = ok[1] ? ld32(q + qoff[1] + c + 8) : 0u;
    }
    float o[DH / 8][4];
#pragma unroll
    for (int dn = 0; dn < DH / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[dn][e] = 0.0f;
    float M[2] = {-INFINITY, -INFINITY}, Z[2] = {0.0f, 0.0f};
    const size_t kstride = (size_t)G * DH;
    // the pool row of key kj (0xffffffff past the block's keys: its chunk row is zero-filled)
    auto pool_row = [&](uint32_t kj) { return kj < maxk ? tab[kj / bs] * bs + kj % bs : 0xffffffffu; };
    // chunk ch's keys and values into stage ch & 1 by cp.async (16 bytes a copy, zero-filled
    // past the keys), one commit group
    auto issue = [&](uint32_t ch) {
        const uint32_t st = ch & 1;
        Row* Ks = reinterpret_cast<Row*>(fsm + st * FLASH_STAGE(DH));
        Row* Vs = reinterpret_cast<Row*>(fsm + st * FLASH_STAGE(DH) + FLASH_STAGE(DH) / 2);
        for (uint32_t e = threadIdx.x; e < KC * DH / 8; e += FT) {
            const uint32_t j = e / (DH / 8), c = (e % (DH / 8)) * 8, kr = krow[st][j];
            const bool in = kr != 0xffffffffu;
            const size_t off = in ? (size_t)kr * kstride + (size_t)g * DH + c : 0;
            cp_async16(&Ks[j][c], k + off, in);
            cp_async16(&Vs[j][c], v + off, in);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    const uint32_t nch = (maxk + KC - 1) / KC;
    if (threadIdx.x < KC) {
        krow[0][threadIdx.x] = pool_row(threadIdx.x);
        krow[1][threadIdx.x] = pool_row(KC + threadIdx.x);
    }
    __syncthreads();
    if (nch > 0) issue(0);
    // chunk ch + 1 loads while chunk ch is computed; the pool rows of chunk ch + 2 are read from
    // the block table meanwhile (kept in a register until krow[ch & 1] is free)
    for (uint32_t ch = 0; ch < nch; ch++) {
        const uint32_t st = ch & 1, c0 = ch * KC;
        const uint32_t next = ch + 2 < nch && threadIdx.x < KC ? pool_row((ch + 2) * KC + threadIdx.x) : 0xffffffffu;
        if (ch + 1 < nch) {
            issue(ch + 1);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();  // chunk ch is in stage st for every thread
        const Row* Ks = reinterpret_cast<const Row*>(fsm + st * FLASH_STAGE(DH));
        const Row* Vs = reinterpret_cast<const Row*>(fsm + st * FLASH_STAGE(DH) + FLASH_STAGE(DH) / 2);
        if (active) {
            float s[KC / 8][4];
    #pragma unroll
            for (int nt = 0; nt < KC / 8; nt++)
    #pragma unroll
                for (int e = 0; e < 4; e++) s[nt][e] = 0.0f;
    #pragma unroll
            for (int kd = 0; kd < DH / 16; kd++) {
    #pragma unroll
                for (int nt = 0; nt < KC / 8; nt++) {
                    const bf16* kp = &Ks[nt * 8 + gid][kd * 16 + 2 * tig];
                    const uint32_t b[2] = {ld32(kp), ld32(kp + 8)};
                    mma16816(s[nt], qf[kd], b);
                }
            }
            float mx[2] = {-INFINITY, -INFINITY};
    #pragma unroll
            for (int nt = 0; nt < KC / 8; nt++)
    #pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = e >> 1;
                    const uint32_t key = c0 + nt * 8 + 2 * tig + (e & 1);
                    const float x = key < nk[i] ? s[nt][e] * scale : -INFINITY;
                    s[nt][e] = x;
                    mx[i] = fmaxf(mx[i], x);
                }
            float alpha[2], mref[2];
    #pragma unroll
            for (int i = 0; i < 2; i++) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                const float mn = fmaxf(M[i], mx[i]);
                mref[i] = mn == -INFINITY ? 0.0f : mn;  // a row with no key yet (padding rows only)
                alpha[i] = expf(M[i] - mref[i]);
                M[i] = mn;
            }
            float zs[2] = {0.0f, 0.0f};
    #pragma unroll
            for (int nt = 0; nt < KC / 8; nt++)
    #pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = e >> 1;
                    const float p = expf(s[nt][e] - mref[i]);
                    s[nt][e] = p;
                    zs[i] += p;
                }
    #pragma unroll
            for (int i = 0; i < 2; i++) {
                zs[i] += __shfl_xor_sync(0xffffffffu, zs[i], 1);
                zs[i] += __shfl_xor_sync(0xffffffffu, zs[i], 2);
                Z[i] = fmaf(Z[i], alpha[i], zs[i]);
            }
    #pragma unroll
            for (int dn = 0; dn < DH / 8; dn++) {
                o[dn][0] *= alpha[0];
                o[dn][1] *= alpha[0];
                o[dn][2] *= alpha[1];
                o[dn][3] *= alpha[1];
            }
    #pragma unroll
            for (int kk = 0; kk < KC / 16; kk++) {
                const uint32_t a[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                                       pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                const int key = kk * 16 + 2 * tig;
    #pragma unroll
                for (int dn = 0; dn < DH / 8; dn++) {
                    const int d = dn * 8 + gid;
                    const uint32_t b[2] = {pack_bf(Vs[key][d], Vs[key + 1][d]), pack_bf(Vs[key + 8][d], Vs[key + 9][d])};
                    mma16816(o[dn], a, b);
                }
            }
        }
        if (ch + 2 < nch && threadIdx.x < KC) krow[st][threadIdx.x] = next;
        __syncthreads();  // stage st and krow[st] are free for chunk ch + 2
    }
    if (!active) return;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!ok[i]) continue;
#pragma unroll
        for (int dn = 0; dn < DH / 8; dn++) {
            const size_t at = qoff[i] + dn * 8 + 2 * tig;
            *reinterpret_cast<uint32_t*>(out + at) = pack2(o[dn][2 * i] / Z[i], o[dn][2 * i + 1] / Z[i]);
        }
        // the row's log-sum-exp of the scaled scores, for the backward (nothing above reads it)
        if (lse != nullptr && tig == 0) lse[qoff[i] / DH] = M[i] + logf(Z[i]);
    }
}

#define FLASH_FWD(DH)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FT) flash_fwd_bf16_##DH(                                          \
        const bf16* q, const bf16* k, const bf16* v, const uint32_t* table, const uint32_t* start,                  \
        const uint32_t* keys, const uint4* tiles, bf16* out, float* lse, uint32_t H, uint32_t G, uint32_t bs,       \
        float scale) {                                                                                             \
        flash_fwd<DH>(q, k, v, table, start, keys, tiles, out, lse, H, G, bs, scale);                              \
    }
FLASH_FWD(16)
FLASH_FWD(32)
FLASH_FWD(64)
FLASH_FWD(128)

// ---- backward (the trainer's; not batch-invariant, never compared bit for bit) ----
// With P = exp(s · scale − lse) (lse saved by the forward), D = rowsum(dO ∘ O) (given):
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − D),  dK = scale · dSᵀ Q,  dQ = scale · dS K.
// Two kernels, no atomics on dQ: `flash_bwd_kv` (a block per 64 keys of a sequence and a kv
// head, 4 warps of 16 keys, over the sequence's rows 16 at a time: dK, dV) and `flash_bwd_q`
// (the forward's blocks of 64 rows over their keys: dQ). P and dS are rounded to bf16 for the
// products, accumulators are f32. dK, dV are added (atomicAdd) into zeroed f32 buffers: a pool
// row seen by several sequences (shared blocks) gets each one's part.

#define BR 16

// chunks[b] = (first query of the sequence, one past its last, first key c0 of the block, the
// most keys any query of the sequence sees)
template <int DH>
__device__ void flash_bwd_kv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                             const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                             const uint32_t* __restrict__ table, const uint32_t* __restrict__ start,
                             const uint32_t* __restrict__ keys, const uint4* __restrict__ chunks, float* __restrict__ dk,
                             float* __restrict__ dv, uint32_t H, uint32_t G, uint32_t bs, float scale) {
    __shared__ __align__(16) bf16 Ks[KC][DH + PAD];
    __shared__ __align__(16) bf16 Vs[KC][DH + PAD];
    __shared__ __align__(16) bf16 Qs[BR][DH + PAD];
    __shared__ __align__(16) bf16 Os[BR][DH + PAD];  // dO rows
    __shared__ float Ls[BR], Ds[BR];
    __shared__ uint32_t Ns[BR];
    __shared__ uint32_t krow[KC];
    const uint4 t = chunks[blockIdx.x];
    const uint32_t qa = t.x, qb = t.y, c0 = t.z, maxk = t.w;
    const uint32_t g = blockIdx.y, R = H / G;
    const uint32_t nrows = (qb - qa) * R;
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const uint32_t* tab = table + start[qa];
    const size_t kstride = (size_t)G * DH;
    for (uint32_t j = threadIdx.x; j < KC; j += FT) {
        const uint32_t kj = c0 + j;
        krow[j] = kj < maxk ? tab[kj / bs] * bs + kj % bs : 0xffffffffu;
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < KC * DH / 8; e += FT) {
        const uint32_t j = e / (DH / 8), c = (e % (DH / 8)) * 8;
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
        if (krow[j] != 0xffffffffu) {
            const size_t off = (size_t)krow[j] * kstride + (size_t)g * DH + c;
            kv = *reinterpret_cast<const uint4*>(k + off);
            vv = *reinterpret_cast<const uint4*>(v + off);
        }
        *reinterpret_cast<uint4*>(&Ks[j][c]) = kv;
        *reinterpret_cast<uint4*>(&Vs[j][c]) = vv;
    }
    // the first query that sees a key of the block: rows before it add exact zeros (P = 0), so
    // the loop starts at its row, rounded down to the BR-row grid (the same row groups, so the
    // same sums, as from row 0); causal sequences skip about half their rows this way
    __shared__ uint32_t first_q;
    if (threadIdx.x == 0) first_q = qb - qa;
    __syncthreads();
    for (uint32_t j = threadIdx.x; j < qb - qa; j += FT)
        if (keys[qa + j] > c0) atomicMin(&first_q, j);
    __syncthreads();
    const uint32_t rstart = first_q * R / BR * BR;
    const uint32_t kw = warp * 16;  // the warp's keys kw..kw+16 of the block
    float dK[DH / 8][4], dV[DH / 8][4];
#pragma unroll
    for (int dn = 0; dn < DH / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dK[dn][e] = dV[dn][e] = 0.0f;
    for (uint32_t r0 = rstart; r0 < nrows; r0 += BR) {
        __syncthreads();  // the previous rows' readers are done (and Ks, Vs are written)
        bool sees = false;
        if (threadIdx.x < BR) {
            const uint32_t r = r0 + threadIdx.x;
            const bool ok = r < nrows;
            const size_t row = ok ? (size_t)(qa + r / R) * H + g * R + r % R : 0;
            Ns[threadIdx.x] = ok ? keys[qa + r / R] : 0;
            Ls[threadIdx.x] = ok ? lse[row] : 0.0f;
            Ds[threadIdx.x] = ok ? delta[row] : 0.0f;
            sees = ok && keys[qa + r / R] > c0;
        }
        for (uint32_t e = threadIdx.x; e < BR * DH / 8; e += FT) {
            const uint32_t i = e / (DH / 8), c = (e % (DH / 8)) * 8, r = r0 + i;
            uint4 qv = make_uint4(0, 0, 0, 0), ov = make_uint4(0, 0, 0, 0);
            if (r < nrows) {
                const size_t off = ((size_t)(qa + r / R) * H + g * R + r % R) * DH + c;
                qv = *reinterpret_cast<const uint4*>(q + off);
                ov = *reinterpret_cast<const uint4*>(dout + off);
            }
            *reinterpret_cast<uint4*>(&Qs[i][c]) = qv;
            *reinterpret_cast<uint4*>(&Os[i][c]) = ov;
        }
        if (!__syncthreads_or(sees)) continue;  // no row of these sees a key of the block
        // Sᵀ (keys × rows) = K Qᵀ and dPᵀ = V dOᵀ
        float st[BR / 8][4], pt[BR / 8][4];
#pragma unroll
        for (int nt = 0; nt < BR / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[nt][e] = pt[nt][e] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < DH / 16; kd++) {
            const int c = kd * 16 + 2 * tig;
            const uint32_t ak[4] = {ld32(&Ks[kw + gid][c]), ld32(&Ks[kw + gid + 8][c]), ld32(&Ks[kw + gid][c + 8]), ld32(&Ks[kw + gid + 8][c + 8])};
            const uint32_t av[4] = {ld32(&Vs[kw + gid][c]), ld32(&Vs[kw + gid + 8][c]), ld32(&Vs[kw + gid][c + 8]), ld32(&Vs[kw + gid + 8][c + 8])};
#pragma unroll
            for (int nt = 0; nt < BR / 8; nt++) {
                const uint32_t bq[2] = {ld32(&Qs[nt * 8 + gid][c]), ld32(&Qs[nt * 8 + gid][c + 8])};
                const uint32_t bo[2] = {ld32(&Os[nt * 8 + gid][c]), ld32(&Os[nt * 8 + gid][c + 8])};
                mma16816(st[nt], ak, bq);
                mma16816(pt[nt], av, bo);
            }
        }
        // P, dS in the same places: element (key kw + gid + 8 (e >> 1), row nt · 8 + 2 tig + (e & 1))
#pragma unroll
        for (int nt = 0; nt < BR / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const uint32_t key = c0 + kw + gid + 8 * (e >> 1), i = nt * 8 + 2 * tig + (e & 1);
                const float p = key < Ns[i] ? expf(st[nt][e] * scale - Ls[i]) : 0.0f;
                st[nt][e] = p;
                pt[nt][e] = p * (pt[nt][e] - Ds[i]);
            }
        // dV += Pᵀ dO and dK += dSᵀ Q over the rows (k = rows, 16 a step)
#pragma unroll
        for (int kk = 0; kk < BR / 16; kk++) {
            const uint32_t ap[4] = {pack2(st[2 * kk][0], st[2 * kk][1]), pack2(st[2 * kk][2], st[2 * kk][3]),
                                    pack2(st[2 * kk + 1][0], st[2 * kk + 1][1]), pack2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
            const uint32_t as[4] = {pack2(pt[2 * kk][0], pt[2 * kk][1]), pack2(pt[2 * kk][2], pt[2 * kk][3]),
                                    pack2(pt[2 * kk + 1][0], pt[2 * kk + 1][1]), pack2(pt[2 * kk + 1][2], pt[2 * kk + 1][3])};
            const int i = kk * 16 + 2 * tig;
#pragma unroll
            for (int dn = 0; dn < DH / 8; dn++) {
                const int d = dn * 8 + gid;
                const uint32_t bo[2] = {pack_bf(Os[i][d], Os[i + 1][d]), pack_bf(Os[i + 8][d], Os[i + 9][d])};
                const uint32_t bq[2] = {pack_bf(Qs[i][d], Qs[i + 1][d]), pack_bf(Qs[i + 8][d], Qs[i + 9][d])};
                mma16816(dV[dn], ap, bo);
                mma16816(dK[dn], as, bq);
            }
        }
    }
#pragma unroll
    for (int hi = 0; hi < 2; hi++) {
        const uint32_t kr = krow[kw + gid + 8 * hi];
        if (kr == 0xffffffffu) continue;
        const size_t base = (size_t)kr * kstride + (size_t)g * DH;
#pragma unroll
        for (int dn = 0; dn < DH / 8; dn++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const size_t at = base + dn * 8 + 2 * tig + e;
                atomicAdd(dk + at, dK[dn][2 * hi + e] * scale);
                atomicAdd(dv + at, dV[dn][2 * hi + e]);
            }
    }
}

// dQ over the forward's tiles (64 rows, 4 warps of 16), keys 32 at a time
template <int DH>
__device__ void flash_bwd_q(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                            const uint32_t* __restrict__ table, const uint32_t* __restrict__ start,
                            const uint32_t* __restrict__ keys, const uint4* __restrict__ tiles, float* __restrict__ dq,
                            uint32_t H, uint32_t G, uint32_t bs, float scale) {
    __shared__ __align__(16) bf16 Ks[KC][DH + PAD];
    __shared__ __align__(16) bf16 Vs[KC][DH + PAD];
    __shared__ uint32_t krow[KC];
    const uint4 t = tiles[blockIdx.x];
    const uint32_t qa = t.x, qb = t.y, r0 = t.z, maxk = t.w;
    const uint32_t g = blockIdx.y, R = H / G;
    const uint32_t nrows = (qb - qa) * R;
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const uint32_t* tab = table + start[qa];
    const uint32_t wr0 = r0 + warp * 16;
    const bool active = wr0 < nrows;
    bool ok[2];
    uint32_t nk[2];
    size_t qoff[2];
    float L[2], Dl[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const uint32_t r = wr0 + gid + 8 * i;
        ok[i] = r < nrows;
        const uint32_t n = qa + (ok[i] ? r / R : 0), h = g * R + (ok[i] ? r % R : 0);
        nk[i] = ok[i] ? keys[n] : 0;
        qoff[i] = ((size_t)n * H + h) * DH;
        L[i] = ok[i] ? lse[qoff[i] / DH] : 0.0f;
        Dl[i] = ok[i] ? delta[qoff[i] / DH] : 0.0f;
    }
    uint32_t qf[DH / 16][4], of[DH / 16][4];
#pragma unroll
    for (int kd = 0; kd < DH / 16; kd++) {
        const int c = kd * 16 + 2 * tig;
        qf[kd][0] = ok[0] ? ld32(q + qoff[0] + c) : 0u;
        qf[kd][1] = ok[1] ? ld32(q + qoff[1] + c) : 0u;
        qf[kd][2] = ok[0] ? ld32(q + qoff[0] + c + 8) : 0u;
        qf[kd][3] = ok[1] ? ld32(q + qoff[1] + c + 8) : 0u;
        of[kd][0] = ok[0] ? ld32(dout + qoff[0] + c) : 0u;
        of[kd][1] = ok[1] ? ld32(dout + qoff[1] + c) : 0u;
        of[kd][2] = ok[0] ? ld32(dout + qoff[0] + c + 8) : 0u;
        of[kd][3] = ok[1] ? ld32(dout + qoff[1] + c + 8) : 0u;
    }
    float acc[DH / 8][4];
#pragma unroll
    for (int dn = 0; dn < DH / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[dn][e] = 0.0f;
    const size_t kstride = (size_t)G * DH;
    for (uint32_t c0 = 0; c0 < maxk; c0 += KC) {
        __syncthreads();
        for (uint32_t j = threadIdx.x; j < KC; j += FT) {
            const uint32_t kj = c0 + j;
            krow[j] = kj < maxk ? tab[kj / bs] * bs + kj % bs : 0xffffffffu;
        }
        __syncthreads();
        for (uint32_t e = threadIdx.x; e < KC * DH / 8; e += FT) {
            const uint32_t j = e / (DH / 8), c = (e % (DH / 8)) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (krow[j] != 0xffffffffu) {
                const size_t off = (size_t)krow[j] * kstride + (size_t)g * DH + c;
                kv = *reinterpret_cast<const uint4*>(k + off);
                vv = *reinterpret_cast<const uint4*>(v + off);
            }
            *reinterpret_cast<uint4*>(&Ks[j][c]) = kv;
            *reinterpret_cast<uint4*>(&Vs[j][c]) = vv;
        }
        __syncthreads();
        if (!active) continue;
#pragma unroll
        for (int half = 0; half < KC / 32; half++) {
            const int k0 = half * 32;
            float s[4][4], dp[4][4];
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
            for (int kd = 0; kd < DH / 16; kd++) {
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    const int j = k0 + nt * 8 + gid, c = kd * 16 + 2 * tig;
                    const uint32_t bk[2] = {ld32(&Ks[j][c]), ld32(&Ks[j][c + 8])};
                    const uint32_t bv[2] = {ld32(&Vs[j][c]), ld32(&Vs[j][c + 8])};
                    mma16816(s[nt], qf[kd], bk);
                    mma16816(dp[nt], of[kd], bv);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = e >> 1;
                    const uint32_t key = c0 + k0 + nt * 8 + 2 * tig + (e & 1);
                    const float p = key < nk[i] ? expf(s[nt][e] * scale - L[i]) : 0.0f;
                    dp[nt][e] = p * (dp[nt][e] - Dl[i]);
                }
#pragma unroll
            for (int kk = 0; kk < 2; kk++) {
                const uint32_t a[4] = {pack2(dp[2 * kk][0], dp[2 * kk][1]), pack2(dp[2 * kk][2], dp[2 * kk][3]),
                                       pack2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), pack2(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
                const int key = k0 + kk * 16 + 2 * tig;
#pragma unroll
                for (int dn = 0; dn < DH / 8; dn++) {
                    const int d = dn * 8 + gid;
                    const uint32_t b[2] = {pack_bf(Ks[key][d], Ks[key + 1][d]), pack_bf(Ks[key + 8][d], Ks[key + 9][d])};
                    mma16816(acc[dn], a, b);
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!ok[i]) continue;
#pragma unroll
        for (int dn = 0; dn < DH / 8; dn++) {
            const size_t at = qoff[i] + dn * 8 + 2 * tig;
            dq[at] = acc[dn][2 * i] * scale;
            dq[at + 1] = acc[dn][2 * i + 1] * scale;
        }
    }
}

#define FLASH_BWD(DH)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FT) flash_bwd_kv_bf16_##DH(                                       \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,        \
        const uint32_t* table, const uint32_t* start, const uint32_t* keys, const uint4* chunks, float* dk,          \
        float* dv, uint32_t H, uint32_t G, uint32_t bs, float scale) {                                             \
        flash_bwd_kv<DH>(q, k, v, dout, lse, delta, table, start, keys, chunks, dk, dv, H, G, bs, scale);          \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FT) flash_bwd_q_bf16_##DH(                                        \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,        \
        const uint32_t* table, const uint32_t* start, const uint32_t* keys, const uint4* tiles, float* dq,           \
        uint32_t H, uint32_t G, uint32_t bs, float scale) {                                                        \
        flash_bwd_q<DH>(q, k, v, dout, lse, delta, table, start, keys, tiles, dq, H, G, bs, scale);                \
    }
FLASH_BWD(16)
FLASH_BWD(32)
FLASH_BWD(64)
FLASH_BWD(128)

// delta[r] = Σ_d dO[r, d] · O[r, d] over the Dh channels of row r (the backward's D), in f32:
// a warp per row, lane l summing channels l, l + 32, ... in ascending order, then a fixed xor
// butterfly. rows = N · H.
extern "C" __global__ void flash_delta_bf16(const bf16* __restrict__ dout, const bf16* __restrict__ o, float* __restrict__ delta,
                                            uint32_t rows, uint32_t dh) {
    const uint32_t lane = threadIdx.x & 31;
    const uint64_t row = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= rows) return;
    const bf16* a = dout + row * dh;
    const bf16* b = o + row * dh;
    float s = 0.0f;
    for (uint32_t d = lane; d < dh; d += 32) s += __bfloat162float(a[d]) * __bfloat162float(b[d]);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) delta[row] = s;
}
