//! Variable-length attention over key tables — the one attention of the batch-invariant path,
//! for the trainer's packed forward and the engine's paged KV cache alike.
//!
//! A packed row of N queries; query n sees the first `keys(n)` keys of its own sequence, in
//! order, wherever they lie: key j of query n is row `table[start(n) + j / bs] · bs + j % bs`
//! of a key pool [R, G, Dh] (bs = block size). The trainer's packed batch is the pool with
//! bs = 1 (a table entry per token); the engine's pool holds fixed-size blocks and a block
//! table per sequence. The arithmetic of a query depends on its sequence's keys alone — never on
//! the other queries of the launch or where the blocks lie — so a decode step over the paged
//! cache equals a full forward over the whole sequence bit for bit:
//!
//! - CPU (f32 / bf16 in, f32 arithmetic): s_j = dot(q, k_j)·scale (`invariant::dot`), the max,
//!   e_j = exp(s_j − max) summed in ascending key order, out = Σ_j (e_j / z) v_j in ascending
//!   key order — the arithmetic the mask-based invariant attention had;
//! - CUDA f32 (`gpu/paged.cu`): the keys in fixed chunks of 128 from key 0 (a chunk's max, sum
//!   and weighted values), chunks merged in ascending order (split-KV with a fixed split order),
//!   so no context length is refused;
//! - CUDA bf16, head dim 16 / 32 / 64 / 128 (`gpu/flash.cu`): tensor cores, the R query heads of
//!   a kv head in one tile (GQA shared), keys in fixed chunks of 64 from key 0 merged online
//!   (flash-attention style), P rounded to bf16 for the P·V product — the same bits for a row
//!   whatever the tile around it.
//!
//! Backward (the trainer's; its order is free, it is never compared bit for bit): on CUDA in
//! bf16 the flash kernels (`flash_bwd_*`: the log-sum-exp kept by the forward, O(N) memory, no
//! [len, len] tensor); elsewhere ordinary candle ops in f32 one sequence at a time (also the
//! reference the GPU test holds the kernels to).
//!
//! Legend: N queries, H query heads, G kv heads (H % G = 0), Dh head dim, R pool rows.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::invariant::dot;

/// Which keys each query sees (module doc). Built once per forward (a step) and shared by
/// every layer; the CUDA copy of its tables is made at the first launch and kept.
#[derive(Debug)]
pub struct KeyLayout {
    table: Vec<u32>,
    q_start: Vec<u32>,
    q_keys: Vec<u32>,
    block_size: usize,
    rows: usize,
    #[cfg(feature = "cuda")]
    pub(crate) device: std::sync::OnceLock<crate::gpu::paged::DeviceLayout>,
    #[cfg(feature = "cuda")]
    pub(crate) flash: std::sync::OnceLock<crate::gpu::flash::Tiles>,
}

impl KeyLayout {
    /// `table`: the sequences' block tables back to back; per query n, `q_start[n]` (where its
    /// sequence's table starts) and `q_keys[n]` ≥ 1 (how many of its keys it sees); every key
    /// row must lie in a pool of `rows` rows. Checked: a bad layout is an error, never a read
    /// out of bounds.
    pub fn new(table: Vec<u32>, q_start: Vec<u32>, q_keys: Vec<u32>, block_size: usize, rows: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::Msg("key layout: block_size must be >= 1".into()));
        }
        if q_start.len() != q_keys.len() {
            return Err(Error::Msg(format!("key layout: {} query starts for {} query key counts", q_start.len(), q_keys.len())));
        }
        if rows > u32::MAX as usize || table.len() > u32::MAX as usize {
            return Err(Error::Msg("key layout: more than 2^32 rows".into()));
        }
        for (n, (&s, &k)) in q_start.iter().zip(&q_keys).enumerate() {
            if k == 0 {
                return Err(Error::Msg(format!("key layout: query {n} sees no key")));
            }
            let blocks = (k as usize).div_ceil(block_size);
            let Some(entries) = table.get(s as usize..s as usize + blocks) else {
                return Err(Error::Msg(format!("key layout: query {n} needs table entries {s}..{} of {}", s as usize + blocks, table.len())));
            };
            if let Some(&b) = entries.iter().find(|&&b| (b as usize + 1) * block_size > rows) {
                return Err(Error::Msg(format!("key layout: query {n}: block {b} outside a pool of {rows} rows (block size {block_size})")));
            }
        }
        Ok(Self {
            table,
            q_start,
            q_keys,
            block_size,
            rows,
            #[cfg(feature = "cuda")]
            device: std::sync::OnceLock::new(),
            #[cfg(feature = "cuda")]
            flash: std::sync::OnceLock::new(),
        })
    }

    /// A packed row of sequences as its own pool (bs = 1): `runs` are (start slot, length),
    /// and the i-th slot of a run sees `visible(i, len)` keys of its run (causal: i + 1).
    pub fn packed(runs: &[(usize, usize)], visible: impl Fn(usize, usize) -> usize) -> Result<Self> {
        let total: usize = runs.iter().map(|r| r.1).sum();
        let (mut table, mut q_start, mut q_keys) = (Vec::with_capacity(total), Vec::with_capacity(total), Vec::with_capacity(total));
        for &(start, len) in runs {
            let at = table.len() as u32;
            table.extend((start..start + len).map(|s| s as u32));
            for i in 0..len {
                q_start.push(at);
                q_keys.push(visible(i, len) as u32);
            }
        }
        let rows = runs.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        Self::new(table, q_start, q_keys, 1, rows)
    }

    pub fn num_queries(&self) -> usize {
        self.q_keys.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }


    /// The pool row of key j of query n.
    #[inline]
    pub fn key_row(&self, n: usize, j: usize) -> usize {
        let bs = self.block_size;
        self.table[self.q_start[n] as usize + j / bs] as usize * bs + j % bs
    }

    /// The tensor-core kernel's blocks for `r` query heads per kv head (`gpu/flash.cu`): rows
    /// are (query, head) pairs of one group, query after query; a block takes up to `rows`
    /// consecutive rows of one group. Per block: (first query of the group, one past its last,
    /// the block's first row, the most keys any of its queries sees).
    pub fn tiles(&self, r: usize, rows: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for (a, b) in self.groups() {
            let total = (b - a) * r;
            for r0 in (0..total).step_by(rows.max(1)) {
                let last = (r0 + rows).min(total) - 1;
                let most = self.q_keys[a + r0 / r..=a + last / r].iter().copied().max().unwrap_or(1);
                out.extend([a as u32, b as u32, r0 as u32, most]);
            }
        }
        out
    }

    /// The flash backward's key blocks (`gpu/flash.cu` `flash_bwd_kv`): per query group, its keys
    /// in chunks of `kc` from key 0 up to the most keys any of its queries sees. Per block: (first
    /// query of the group, one past its last, first key of the chunk, that most).
    pub fn key_chunks(&self, kc: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for (a, b) in self.groups() {
            let most = self.q_keys[a..b].iter().copied().max().unwrap_or(1);
            for c0 in (0..most).step_by(kc.max(1)) {
                out.extend([a as u32, b as u32, c0, most]);
            }
        }
        out
    }

    /// The queries in groups that share one key list (a sequence of the packed row: the same
    /// table segment), as contiguous ranges `[a, b)` covering 0..N in order.
    fn groups(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for n in 0..self.num_queries() {
            match out.last_mut() {
                Some(g) if self.q_start[g.0] == self.q_start[n] => g.1 = n + 1,
                _ => out.push((n, n + 1)),
            }
        }
        out
    }
}

struct Varlen {
    layout: Arc<KeyLayout>,
    scale: f32,
    /// keep the flash forward's log-sum-exp for the backward (an input takes gradients)
    #[cfg(feature = "cuda")]
    keep_lse: bool,
    #[cfg(feature = "cuda")]
    lse: std::sync::Mutex<Option<Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>>,
}

impl Varlen {
    /// (N, H, G, Dh) after checking the shapes against each other and the layout.
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (n, h, dh) = lq.shape().dims3()?;
        let (r, g, dh2) = lk.shape().dims3()?;
        if lv.shape() != lk.shape() || dh2 != dh || g == 0 || h % g != 0 {
            return Err(Error::Msg(format!("varlen attention: q {:?}, k {:?}, v {:?} do not fit", lq.dims(), lk.dims(), lv.dims())));
        }
        if n != self.layout.num_queries() || r < self.layout.rows {
            return Err(Error::Msg(format!("varlen attention: {n} queries over {r} rows, the layout has {} over {}", self.layout.num_queries(), self.layout.rows)));
        }
        Ok((n, h, g, dh))
    }
}

impl CustomOp3 for Varlen {
    fn name(&self) -> &'static str {
        "varlen-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, g, dh) = self.dims(l1, l2, l3)?;
        let (q, k, v) = (super::cpu_f32("varlen attention", s1, l1, "q")?, super::cpu_f32("varlen attention", s2, l2, "k")?, super::cpu_f32("varlen attention", s3, l3, "v")?);
        let r = h / g;
        let lay = &self.layout;
        let mut out = vec![0f32; n * h * dh];
        out.par_chunks_mut(dh).enumerate().for_each(|(row, o)| {
            let (qi, hh) = (row / h, row % h);
            let gg = hh / r;
            let qv = &q[row * dh..(row + 1) * dh];
            let keys = lay.q_keys[qi] as usize;
            let at = |j: usize| (lay.key_row(qi, j) * g + gg) * dh;
            let mut scores: Vec<f32> = (0..keys).map(|j| dot(qv, &k[at(j)..at(j) + dh]) * self.scale).collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
            let mut z = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                z += *s;
            }
            for (j, &e) in scores.iter().enumerate() {
                let p = e / z;
                let vj = &v[at(j)..at(j) + dh];
                for d in 0..dh {
                    o[d] += p * vj[d];
                }
            }
        });
        let shape = Shape::from((n, h, dh));
        Ok(match s1 {
            CpuStorage::BF16(_) => (CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()), shape),
            _ => (CpuStorage::F32(out), shape),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, h, g, dh) = self.dims(l1, l2, l3)?;
        let lay = &self.layout;
        let host = crate::gpu::paged::HostLayout { table: &lay.table, start: &lay.q_start, keys: &lay.q_keys, block_size: lay.block_size, device: &lay.device };
        if crate::gpu::flash::serves(candle_core::backend::BackendStorage::dtype(s1), dh) {
            let tiles = |r: usize| Ok(lay.tiles(r, crate::gpu::flash::ROWS));
            let (out, shape, lse) = crate::gpu::flash::attention((s1, l1, s2, l2, s3, l3), &host, tiles, &lay.flash, (n, h, g, dh), self.scale, self.keep_lse)?;
            if let Some(lse) = lse {
                *self.lse.lock().map_err(|_| Error::Msg("varlen attention: a poisoned lock".into()))? = Some(Arc::new(lse));
            }
            return Ok((out, shape));
        }
        crate::gpu::paged::varlen_attention(s1, l1, s2, l2, s3, l3, &host, (n, h, g, dh), self.scale)
    }

    /// The flash kernels where the forward ran them (and kept the log-sum-exp), else
    /// [`reference_bwd`].
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, g_o: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        {
            let lse = self.lse.lock().map_err(|_| Error::Msg("varlen attention: a poisoned lock".into()))?.clone();
            if let Some(lse) = lse {
                return self.flash_bwd(q, k, v, o, g_o, lse);
            }
        }
        reference_bwd(&self.layout, self.scale, q, k, v, o, g_o)
    }
}

#[cfg(feature = "cuda")]
impl Varlen {
    /// The flash backward: δ = rowsum(dO ∘ O) in one launch ([`FlashDelta`]), then
    /// `gpu::flash::backward`.
    fn flash_bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, g_o: &Tensor, lse: Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h, dh) = q.dims3()?;
        let (rows, g, _) = k.dims3()?;
        let d_o = g_o.to_dtype(DType::BF16)?.contiguous()?;
        let delta = d_o.apply_op2_no_bwd(&o.contiguous()?, &FlashDelta)?;
        let op = FlashBwd { layout: self.layout.clone(), scale: self.scale, d_o, delta, lse };
        let grads = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (n * h * dh, rows * g * dh);
        let d_q = grads.narrow(0, 0, nq)?.reshape((n, h, dh))?.to_dtype(q.dtype())?;
        let d_k = grads.narrow(0, nq, nk)?.reshape((rows, g, dh))?.to_dtype(k.dtype())?;
        let d_v = grads.narrow(0, nq + nk, nk)?.reshape((rows, g, dh))?.to_dtype(v.dtype())?;
        Ok((Some(d_q), Some(d_k), Some(d_v)))
    }
}

/// δ = rowsum(dO ∘ O) [N, H, 1] f32 of (dO, O), both bf16 [N, H, Dh] (`gpu::flash::delta`).
#[cfg(feature = "cuda")]
struct FlashDelta;

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for FlashDelta {
    fn name(&self) -> &'static str {
        "flash-delta"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(Error::Msg("flash delta: a CUDA op (the flash backward runs only there)".into()))
    }

    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::flash::delta((s1, l1), (s2, l2))
    }
}

/// The flash backward's launch as an op on (q, k, v): one f32 buffer dq ‖ dk ‖ dv.
#[cfg(feature = "cuda")]
struct FlashBwd {
    layout: Arc<KeyLayout>,
    scale: f32,
    d_o: Tensor,
    delta: Tensor,
    lse: Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for FlashBwd {
    fn name(&self) -> &'static str {
        "varlen-attention-flash-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(Error::Msg("varlen attention: the flash backward runs on CUDA only".into()))
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, h, dh) = l1.shape().dims3()?;
        let (rows, g, _) = l2.shape().dims3()?;
        let lay = &self.layout;
        let host = crate::gpu::paged::HostLayout { table: &lay.table, start: &lay.q_start, keys: &lay.q_keys, block_size: lay.block_size, device: &lay.device };
        let tiles = |r: usize| Ok(lay.tiles(r, crate::gpu::flash::ROWS));
        let chunks = lay.key_chunks(crate::gpu::flash::KEYS);
        crate::gpu::flash::backward((s1, l1, s2, l2, s3, l3), (&self.d_o, &self.delta, &self.lse), &host, tiles, &lay.flash, &chunks, (n, h, g, dh, rows), self.scale)
    }
}

/// Ordinary candle ops in f32, one sequence (query group) at a time over its own keys:
/// memory O(H · len²) for the longest sequence, never [N, R] over the packed row.
fn reference_bwd(lay: &KeyLayout, scale: f32, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, g_o: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (_, h, dh) = q.dims3()?;
    let (rows, g, _) = k.dims3()?;
    let r = h / g;
    let dev = q.device();
    let f32c = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let (q32, o32, go32, k32, v32) = (f32c(q)?, f32c(o)?, f32c(g_o)?, f32c(k)?, f32c(v)?);
    // [nq, H, Dh] → [1, H, nq, Dh]; keys [K, G, Dh] → [1, H, K, Dh] (kv heads repeated)
    let heads = |t: Tensor| -> Result<Tensor> { t.transpose(0, 1)?.contiguous()?.unsqueeze(0) };
    let expand = |x: Tensor, kk: usize| -> Result<Tensor> { heads(x)?.unsqueeze(2)?.broadcast_as((1, g, r, kk, dh))?.reshape((1, h, kk, dh)) };
    let fold = |x: Tensor, kk: usize| -> Result<Tensor> { x.reshape((g, r, kk, dh))?.sum(1)?.transpose(0, 1)?.contiguous() };
    let mut d_q_parts = Vec::new();
    let mut d_k = Tensor::zeros((rows, g, dh), DType::F32, dev)?;
    let mut d_v = Tensor::zeros((rows, g, dh), DType::F32, dev)?;
    for (a, b) in lay.groups() {
        let nq = b - a;
        let kk = (a..b).map(|n| lay.q_keys[n] as usize).max().unwrap_or(1);
        let key_rows: Vec<u32> = (0..kk).map(|j| lay.key_row(a, j) as u32).collect();
        let mut bias = vec![f32::NEG_INFINITY; nq * kk];
        for (i, n) in (a..b).enumerate() {
            bias[i * kk..i * kk + lay.q_keys[n] as usize].fill(0.0);
        }
        let bias = Tensor::from_vec(bias, (1, 1, nq, kk), dev)?;
        let idx = Tensor::from_vec(key_rows, kk, dev)?;
        let (qh, oh, goh) = (heads(q32.narrow(0, a, nq)?)?, heads(o32.narrow(0, a, nq)?)?, heads(go32.narrow(0, a, nq)?)?);
        let (ke, ve) = (expand(k32.index_select(&idx, 0)?, kk)?, expand(v32.index_select(&idx, 0)?, kk)?);
        let s = (qh.matmul(&ke.t()?)? * scale as f64)?.broadcast_add(&bias)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        let dv = p.t()?.matmul(&goh)?; // [1, H, K, Dh]
        let dp = goh.matmul(&ve.t()?)?; // [1, H, nq, K]
        let delta = (&goh * &oh)?.sum_keepdim(D::Minus1)?;
        let ds = (&p * dp.broadcast_sub(&delta)?)?;
        let dq = (ds.matmul(&ke)? * scale as f64)?;
        let dk = (ds.t()?.matmul(&qh)? * scale as f64)?;
        d_q_parts.push(dq.squeeze(0)?.transpose(0, 1)?.contiguous()?);
        d_k = d_k.index_add(&idx, &fold(dk, kk)?, 0)?;
        d_v = d_v.index_add(&idx, &fold(dv, kk)?, 0)?;
    }
    let d_q = if d_q_parts.is_empty() { q32.zeros_like()? } else { Tensor::cat(&d_q_parts, 0)? };
    Ok((Some(d_q.to_dtype(q.dtype())?), Some(d_k.to_dtype(k.dtype())?), Some(d_v.to_dtype(v.dtype())?)))
}

/// Attention of q [N, H, Dh] over the key pool k, v [R, G, Dh] under `layout` → [N, H, Dh]
/// in q's dtype (f32 or bf16; arithmetic in f32), batch-invariant (module doc).
pub fn attention(q_NHD: &Tensor, k_RGD: &Tensor, v_RGD: &Tensor, layout: Arc<KeyLayout>, scale: f32) -> Result<Tensor> {
    let dt = q_NHD.dtype();
    for (name, t) in [("k", k_RGD), ("v", v_RGD)] {
        if t.dtype() != dt {
            return Err(Error::Msg(format!("varlen attention: {name} is {:?}, q is {dt:?}", t.dtype())));
        }
    }
    let op = Varlen {
        layout,
        scale,
        #[cfg(feature = "cuda")]
        keep_lse: q_NHD.track_op() || k_RGD.track_op() || v_RGD.track_op(),
        #[cfg(feature = "cuda")]
        lse: std::sync::Mutex::new(None),
    };
    q_NHD.contiguous()?.apply_op3(&k_RGD.contiguous()?, &v_RGD.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::KeyLayout;

    #[test]
    fn tiles_cover_every_row_once_with_the_most_keys() {
        // a decode step (three one-query sequences) then a packed causal sequence of 20 queries
        let table: Vec<u32> = (0..23).collect();
        let (mut start, mut keys) = (vec![0u32, 1, 2], vec![1u32, 1, 1]);
        start.extend(std::iter::repeat_n(3u32, 20));
        keys.extend(1..=20u32);
        let lay = KeyLayout::new(table, start, keys, 1, 23).unwrap();
        let t: Vec<[u32; 4]> = lay.tiles(8, 64).chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
        assert_eq!(t, vec![[0, 1, 0, 1], [1, 2, 0, 1], [2, 3, 0, 1], [3, 23, 0, 8], [3, 23, 64, 16], [3, 23, 128, 20]]);
        // one head per kv head: 64 queries a block
        let t = lay.tiles(1, 64);
        assert_eq!(t[12..], [3, 23, 0, 20]);
    }

    #[test]
    fn key_chunks_cover_each_sequences_keys_from_key_0() {
        // sequences of 1, 130 (causal) and 3 (bidirectional) queries
        let mut start = vec![0u32];
        let mut keys = vec![1u32];
        start.extend(std::iter::repeat_n(1u32, 130));
        keys.extend(1..=130u32);
        start.extend([131u32; 3]);
        keys.extend([3u32; 3]);
        let lay = KeyLayout::new((0..134).collect(), start, keys, 1, 134).unwrap();
        let c: Vec<[u32; 4]> = lay.key_chunks(64).chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
        assert_eq!(c, vec![[0, 1, 0, 1], [1, 131, 0, 130], [1, 131, 64, 130], [1, 131, 128, 130], [131, 134, 0, 3]]);
    }
}
