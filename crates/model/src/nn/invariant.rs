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

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => return Err(Error::Msg(format!("invariant kernel: {what} must be f32"))),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(Error::Msg(format!("invariant kernel: {what} must be contiguous"))),
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
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
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
