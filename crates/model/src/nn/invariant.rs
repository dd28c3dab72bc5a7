//! Batch-invariant kernels (CPU: f32; CUDA: `crate::gpu::invariant`, the matmul in f32 or bf16
//! with f32 accumulation): every output element is computed by the same sequence of
//! floating-point operations whatever the number of rows in the batch, the row's position in it,
//! or how many masked keys surround it. This is what makes an engine's decode step (one row)
//! reproduce the trainer's packed forward (many rows) bit for bit; candle's gemm does not (a
//! lone row differs from the same row inside a larger product).
//!
//! - `matmul_nt(x [M, K], w [N, K]) → [M, N]`: y[m, n] = dot(x[m], w[n]) with one fixed
//!   8-lane accumulation order over K.
//! - attention: `crate::nn::varlen` (over key tables: the trainer's packed rows and the engine's
//!   paged cache alike), with this file's `dot`.
//!
//! It carries gradients: their backward uses ordinary candle ops (exactness is needed of the
//! forward only). The CUDA kernels keep the same contract with their own fixed order (one fmaf
//! chain per dot product), so a GPU run is invariant within itself; CPU and GPU results differ by
//! rounding.

use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Fixed-order dot product: 8 lane accumulators over full chunks, a fixed reduction tree, then
/// the tail in order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// A contiguous f32 or bf16 input as f32 values (bf16 widened exactly).
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<std::borrow::Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        return Err(Error::Msg(format!("invariant kernel: {what} must be contiguous")));
    };
    match s {
        CpuStorage::F32(v) => Ok(std::borrow::Cow::Borrowed(&v[a..b])),
        CpuStorage::BF16(v) => Ok(std::borrow::Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect())),
        _ => Err(Error::Msg(format!("invariant kernel: {what} must be f32 or bf16"))),
    }
}

/// f32 results in the input's storage type (bf16 rounded to nearest even, as a cast does).
fn like_input(s: &CpuStorage, out: Vec<f32>) -> CpuStorage {
    match s {
        CpuStorage::BF16(_) => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(out),
    }
}

struct MatmulNt;

impl CustomOp2 for MatmulNt {
    fn name(&self) -> &'static str {
        "invariant-matmul-nt"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            return Err(Error::Msg(format!("invariant matmul: inner dims {k} vs {k2}")));
        }
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "w")?;
        let mut out = vec![0f32; m * n];
        out.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
            let xr = &x[r * k..(r + 1) * k];
            for (c, o) in row.iter_mut().enumerate() {
                *o = dot(xr, &w[c * k..(c + 1) * k]);
            }
        });
        Ok((like_input(s1, out), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::invariant::matmul_nt(s1, l1, s2, l2)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.matmul(w)?), Some(g.t()?.matmul(x)?)))
    }
}

/// x [.., K] · wᵀ (w [N, K]) → [.., N], batch-invariant.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| Error::Msg("invariant matmul: scalar input".into()))?;
    let m = x.elem_count() / k.max(1);
    let y = x.contiguous()?.reshape((m, k))?.apply_op2(&w.contiguous()?, MatmulNt)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out)
}

/// The engine's three projections of one x (q, k and v) in one launch on CUDA: the same bits as
/// three [`matmul_nt`]s (every element takes the thin kernel's chain), one launch instead of three
/// latency-bound ones at decode. `None` where it does not apply (the CPU, f32, unaligned inputs,
/// odd widths): the caller then runs the three products. No gradient flows through it (the
/// engine's paged forward only).
pub fn matmul_nt3(x: &Tensor, ws: [&Tensor; 3]) -> Result<Option<[Tensor; 3]>> {
    #[cfg(feature = "cuda")]
    {
        let dims = x.dims().to_vec();
        let k = *dims.last().ok_or_else(|| Error::Msg("invariant matmul x3: scalar input".into()))?;
        let m = x.elem_count() / k.max(1);
        let cuda = x.device().is_cuda() && x.dtype() == candle_core::DType::BF16 && ws.iter().all(|w| w.dtype() == candle_core::DType::BF16 && w.is_contiguous());
        if !cuda || !x.is_contiguous() {
            return Ok(None);
        }
        let offs = [ws[0].layout().start_offset(), ws[1].layout().start_offset(), ws[2].layout().start_offset()];
        let n = [ws[0].dim(0)?, ws[1].dim(0)?, ws[2].dim(0)?];
        if !crate::gpu::invariant::nt3_fits(k, x.layout().start_offset(), offs, n) {
            return Ok(None);
        }
        let op = MatmulNt3 { w: [ws[0].clone(), ws[1].clone(), ws[2].clone()] };
        let y = x.reshape((m, k))?.apply_op1_no_bwd(&op)?;
        let part = |at: usize, ni: usize| -> Result<Tensor> {
            let mut shape = dims.clone();
            *shape.last_mut().expect("non-empty") = ni;
            y.narrow(0, at, m * ni)?.reshape(shape)
        };
        Ok(Some([part(0, n[0])?, part(m * n[0], n[1])?, part(m * (n[0] + n[1]), n[2])?]))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, ws);
        Ok(None)
    }
}

/// [`matmul_nt3`]'s op: x the input, the weights held (their storage read at launch).
#[cfg(feature = "cuda")]
struct MatmulNt3 {
    w: [Tensor; 3],
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for MatmulNt3 {
    fn name(&self) -> &'static str {
        "invariant-matmul-nt3"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(Error::Msg("invariant matmul x3: CUDA only (matmul_nt3 returns None elsewhere)".into()))
    }

    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let guards: Vec<_> = self.w.iter().map(|w| w.storage_and_layout()).collect();
        let mut ws = Vec::with_capacity(3);
        for (i, (st, wl)) in guards.iter().enumerate() {
            match &**st {
                candle_core::Storage::Cuda(c) => ws.push((c, *wl)),
                _ => return Err(Error::Msg(format!("invariant matmul x3: weight {i} is not on the GPU"))),
            }
        }
        crate::gpu::invariant::matmul_nt3(s, l, [ws[0], ws[1], ws[2]])
    }
}

/// The experts' grouped product, batch-invariant: x [A, K] holds expert e's `counts[e]` rows
/// back to back; y[a] = x[a] · w[e(a)]ᵀ (w [E, N, K]) with `dot`'s fixed order on the CPU and
/// the single-expert kernels' order on CUDA — one op (one launch) for every expert.
struct GroupedMatmulNt {
    counts: std::sync::Arc<Vec<usize>>,
}

impl CustomOp2 for GroupedMatmulNt {
    fn name(&self) -> &'static str {
        "invariant-grouped-matmul-nt"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, k) = l1.shape().dims2()?;
        let (e, n, k2) = l2.shape().dims3()?;
        if k != k2 || self.counts.len() != e || self.counts.iter().sum::<usize>() != a {
            return Err(Error::Msg(format!("invariant grouped matmul: x [{a}, {k}], w [{e}, {n}, {k2}], counts {:?}", self.counts)));
        }
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "w")?;
        let mut expert_of = Vec::with_capacity(a);
        for (ex, &c) in self.counts.iter().enumerate() {
            expert_of.extend(std::iter::repeat_n(ex, c));
        }
        let mut out = vec![0f32; a * n];
        out.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
            let xr = &x[r * k..(r + 1) * k];
            let we = &w[expert_of[r] * n * k..(expert_of[r] + 1) * n * k];
            for (c, o) in row.iter_mut().enumerate() {
                *o = dot(xr, &we[c * k..(c + 1) * k]);
            }
        });
        Ok((like_input(s1, out), Shape::from((a, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::invariant::grouped_nt(s1, l1, s2, l2, &self.counts)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        grouped_bwd(x, w, g, &self.counts)
    }
}

/// The backward of the grouped product x [A, K] · w[e]ᵀ (`counts[e]` rows of expert e back to
/// back): dx and dw (the backward is not compared bitwise). CUDA: two cuBLAS grouped GEMMs
/// (`gpu::grouped_bwd`); CPU: candle's matmuls per expert.
pub(crate) fn grouped_bwd(x: &Tensor, w: &Tensor, g: &Tensor, counts: &[usize]) -> Result<(Option<Tensor>, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (dx, dw) = crate::gpu::grouped_bwd::grouped_bwd(x, w, g, counts)?;
        return Ok((Some(dx), Some(dw)));
    }
    let (e, n, k) = w.dims3()?;
    let (mut dx, mut dw) = (Vec::new(), Vec::with_capacity(e));
    let mut start = 0;
    for (ex, &c) in counts.iter().enumerate() {
        if c == 0 {
            dw.push(Tensor::zeros((n, k), w.dtype(), w.device())?);
            continue;
        }
        let (xe, ge, we) = (x.narrow(0, start, c)?, g.narrow(0, start, c)?, w.get(ex)?);
        dx.push(ge.matmul(&we)?);
        dw.push(ge.t()?.matmul(&xe)?);
        start += c;
    }
    let dx = if dx.is_empty() { x.zeros_like()? } else { Tensor::cat(&dx, 0)? };
    Ok((Some(dx), Some(Tensor::stack(&dw, 0)?)))
}

/// x [A, K] (expert e's `counts[e]` rows back to back) · w[e]ᵀ (w [E, N, K]) → [A, N],
/// batch-invariant, one op for every expert.
pub fn grouped_matmul_nt(x: &Tensor, w: &Tensor, counts: &[usize]) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, GroupedMatmulNt { counts: std::sync::Arc::new(counts.to_vec()) })
}
