//! Batch-invariant kernels (CPU: f32; CUDA: `crate::gpu::invariant`, the matmul in f32 or bf16
//! with f32 accumulation): every output element is computed by the same sequence of
//! floating-point operations whatever the number of rows in the batch, the row's position in it,
//! or how many masked keys surround it. This is what makes an engine's decode step (one row)
//! reproduce the trainer's packed forward (many rows) bit for bit; candle's gemm does not (a
//! lone row differs from the same row inside a larger product).
//!
//! - `matmul_nt(x [M, K], w [N, K]) → [M, N]`: y[m, n] = dot(x[m], w[n]) with one fixed
//!   8-lane accumulation order over K.
//! - `attention(q [B, H, Tq, Dh], k, v [B, G, Tk, Dh], visible [B, Tq, Tk])`: per query, the
//!   visible keys in ascending order: s_j = dot(q, k_j)·scale, softmax with max-subtraction and
//!   a sequential sum, then out = Σ_j p_j v_j sequentially. Masked keys are skipped, not added as
//!   zeros, so a decode step over a KV cache and a full causal forward agree exactly.
//!
//! Both carry gradients: their backward uses ordinary candle ops (exactness is needed of the
//! forward only). The CUDA kernels keep the same contract with their own fixed order (one fmaf
//! chain per dot product), so a GPU run is invariant within itself; CPU and GPU results differ by
//! rounding.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, D};
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

struct Attention {
    /// [B, Tq, Tk] 1 = visible
    visible: Arc<Vec<u8>>,
    scale: f32,
}

impl Attention {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, usize, usize, usize)> {
        let (b, h, tq, dh) = l1.shape().dims4()?;
        let (_, g, tk, _) = l2.shape().dims4()?;
        Ok((b, h, tq, dh, g, tk))
    }

    /// Additive bias [B, 1, Tq, Tk] (0 / -inf) for the backward's recomputation.
    fn bias(&self, b: usize, tq: usize, tk: usize, dev: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<f32> = self.visible.iter().map(|&m| if m == 1 { 0.0 } else { f32::NEG_INFINITY }).collect();
        Tensor::from_vec(v, (b, 1, tq, tk), dev)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "invariant-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, tq, dh, g, tk) = Self::dims(l1, l2)?;
        if self.visible.len() != b * tq * tk {
            return Err(Error::Msg("invariant attention: mask shape".into()));
        }
        let (q, k, v) = (f32_slice(s1, l1, "q")?, f32_slice(s2, l2, "k")?, f32_slice(s3, l3, "v")?);
        let r = h / g;
        let mut out = vec![0f32; b * h * tq * dh];
        out.par_chunks_mut(dh).enumerate().for_each(|(row, o)| {
            let i = row % tq;
            let hh = (row / tq) % h;
            let bb = row / (tq * h);
            let gg = hh / r;
            let qv = &q[row * dh..(row + 1) * dh];
            let kbase = (bb * g + gg) * tk * dh;
            let mask = &self.visible[(bb * tq + i) * tk..(bb * tq + i + 1) * tk];
            let mut scores: Vec<(usize, f32)> = Vec::new();
            for (j, &m) in mask.iter().enumerate() {
                if m == 1 {
                    scores.push((j, dot(qv, &k[kbase + j * dh..kbase + (j + 1) * dh]) * self.scale));
                }
            }
            if scores.is_empty() {
                return;
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &(_, s)| a.max(s));
            let mut z = 0f32;
            for (_, s) in scores.iter_mut() {
                *s = (*s - max).exp();
                z += *s;
            }
            for &(j, e) in &scores {
                let p = e / z;
                let vj = &v[kbase + j * dh..kbase + (j + 1) * dh];
                for d in 0..dh {
                    o[d] += p * vj[d];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, tq, dh))))
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
        crate::gpu::invariant::attention(s1, l1, s2, l2, s3, l3, &self.visible, self.scale)
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, g_o: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, dh) = q.dims4()?;
        let (_, g, tk, _) = k.dims4()?;
        let r = h / g;
        let expand = |x: &Tensor| -> Result<Tensor> {
            x.unsqueeze(2)?.broadcast_as((b, g, r, tk, dh))?.reshape((b, h, tk, dh))
        };
        let (ke, ve) = (expand(k)?, expand(v)?);
        let s = (q.matmul(&ke.t()?)? * self.scale as f64)?.broadcast_add(&self.bias(b, tq, tk, q.device())?)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        let d_v = p.t()?.matmul(g_o)?; // [B, H, Tk, Dh]
        let d_p = g_o.matmul(&ve.t()?)?; // [B, H, Tq, Tk]
        let delta = (g_o * o)?.sum_keepdim(D::Minus1)?;
        let d_s = (&p * d_p.broadcast_sub(&delta)?)?;
        let d_q = (d_s.matmul(&ke)? * self.scale as f64)?;
        let d_k = (d_s.t()?.matmul(q)? * self.scale as f64)?;
        let fold = |x: Tensor| -> Result<Tensor> { x.reshape((b, g, r, tk, dh))?.sum(2) };
        Ok((Some(d_q), Some(fold(d_k)?), Some(fold(d_v)?)))
    }
}

/// Softmax attention of q [B, H, Tq, Dh] over k, v [B, G, Tk, Dh] where `visible[b][i][j]` says
/// whether query i sees key j; batch-invariant (module doc).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, visible: Arc<Vec<u8>>, scale: f32) -> Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dtype() != DType::F32 {
            return Err(Error::Msg(format!("invariant attention: {name} must be f32")));
        }
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { visible, scale })
}
