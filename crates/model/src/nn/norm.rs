//! RMSNorm as transformers computes it: `w * (x * rsqrt(mean(x^2) + eps))`, in f32.
//!
//! With the batch-invariant kernels (`Kernels::Invariant`, the engine's and the trainer's
//! default) it is one op ([`fused`]): per row s = Σ x² in f32 in a fixed order, r = 1 /
//! sqrt(s / D + eps), out = round(round(x · r) · w) in x's dtype — one launch (`gpu/norm.cu`)
//! instead of ten, the same arithmetic for a row whatever the rows around it; its backward is
//! the analytic one in f32. `Kernels::Autograd` keeps the composed candle ops.
//!
//! Legend: N rows, D the normalised (last) dimension.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

use super::Kernels;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
    kernels: Kernels,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps, kernels: Kernels::Autograd })
    }

    pub fn set_kernels(&mut self, k: Kernels) {
        self.kernels = k;
    }

    /// The eps under the square root.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Inference => return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32),
            Kernels::Invariant => return fused(x, &self.weight, self.eps as f32),
            Kernels::Autograd => {}
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

impl RmsNorm {
    /// The residual add before this norm and the norm, in one launch where the engine's kernel
    /// applies (CUDA, batch-invariant kernels, rows of at most 2,048, one dtype): (a + b, its
    /// norm) with the bits of the add and [`Module::forward`] one after the other; `None`
    /// otherwise. No gradient (the engine's paged forward).
    pub(crate) fn add_forward(&self, a: &Tensor, b: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let d = a.dim(D::Minus1)?;
        let fits = a.device().is_cuda() && self.kernels == Kernels::Invariant && d <= 2048 && a.dims() == b.dims() && self.weight.dims() == [d];
        if !fits || a.dtype() != b.dtype() || a.dtype() != self.weight.dtype() || !matches!(a.dtype(), DType::F32 | DType::BF16) {
            return Ok(None);
        }
        let both = a.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, &self.weight.contiguous()?, &AddRmsNorm { eps: self.eps as f32 })?;
        let shape = a.shape().clone();
        Ok(Some((both.get(0)?.reshape(&shape)?, both.get(1)?.reshape(shape)?)))
    }
}

/// [`RmsNorm::add_forward`]'s op: (a, b, w) → [2, N, D] (the sums, then their norms). CUDA only.
struct AddRmsNorm {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eps: f32,
}

impl candle_core::CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("add + rms norm: CUDA only (add_forward returns None elsewhere)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = *l1.dims().last().unwrap_or(&1);
        let n = l1.shape().elem_count().checked_div(d).unwrap_or(0);
        crate::gpu::norm::add_rms_norm((s1, l1), (s2, l2), (s3, l3), (n, d), self.eps)
    }
}

/// The fused RMSNorm of x [.., D] with weight w [D] (module doc): f32 or bf16, w in x's dtype.
pub fn fused(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] || w.dtype() != x.dtype() {
        candle_core::bail!("rms norm: weight {:?} {:?} for rows of {d} {:?}", w.dims(), w.dtype(), x.dtype());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, FusedRmsNorm { eps })
}

struct FusedRmsNorm {
    eps: f32,
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let d = *l1.dims().last().unwrap_or(&1);
        let (x, w) = (super::cpu_f32("rms norm", s1, l1, "x")?, super::cpu_f32("rms norm", s2, l2, "weight")?);
        let bf = matches!(s1, CpuStorage::BF16(_));
        let round = |v: f32| if bf { half::bf16::from_f32(v).to_f32() } else { v };
        let mut out = vec![0f32; x.len()];
        if d > 0 {
            out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
                let s = xr.iter().fold(0f32, |s, &v| v.mul_add(v, s));
                let r = 1.0 / (s / d as f32 + self.eps).sqrt();
                for ((o, &v), &wi) in o.iter_mut().zip(xr).zip(w.iter()) {
                    *o = round(v * r) * wi;
                }
            });
        }
        let shape = l1.shape().clone();
        Ok(if bf { (CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()), shape) } else { (CpuStorage::F32(out), shape) })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = *l1.dims().last().unwrap_or(&1);
        let n = l1.shape().elem_count().checked_div(d).unwrap_or(0);
        crate::gpu::norm::rms_norm(s1, l1, s2, l2, (n, d), self.eps)
    }

    /// With n = x · r (f32) and g the output's gradient: dw = Σ_rows g ∘ round(n),
    /// dx = r · (g∘w − n · mean(g∘w ∘ n)) — in f32, then in the inputs' dtypes: one op for dx
    /// and one for the rows of dw ([`RmsNormBwd`]; on CUDA a warp per row, `gpu/norm.cu`), the
    /// rows summed by a product with ones (no strided reduction over the rows).
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.to_dtype(x.dtype())?.contiguous()?);
        let dx = x.apply_op3_no_bwd(&w, &g, &RmsNormBwd { eps: self.eps, out: BwdOut::Dx })?;
        let pw = x.apply_op3_no_bwd(&w, &g, &RmsNormBwd { eps: self.eps, out: BwdOut::WeightRows })?.reshape((rows, d))?;
        let dw = Tensor::ones((1, rows), DType::F32, pw.device())?.matmul(&pw)?.reshape(d)?;
        Ok((Some(dx), Some(dw.to_dtype(w.dtype())?)))
    }
}

/// Which output [`RmsNormBwd`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BwdOut {
    /// dx, x's shape and dtype
    Dx,
    /// g ∘ round(n), x's shape, f32
    WeightRows,
}

/// (x, w, g) → dx or the rows of dw (see `FusedRmsNorm::bwd`), g in x's dtype.
struct RmsNormBwd {
    eps: f32,
    out: BwdOut,
}

impl candle_core::CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let d = *l1.dims().last().unwrap_or(&1);
        let op = "rms norm backward";
        let (x, w, g) = (super::cpu_f32(op, s1, l1, "x")?, super::cpu_f32(op, s2, l2, "weight")?, super::cpu_f32(op, s3, l3, "gradient")?);
        if g.len() != x.len() || w.len() != d {
            candle_core::bail!("{op}: x {:?}, weight {:?}, gradient {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let bf = matches!(s1, CpuStorage::BF16(_));
        let round = |v: f32| if bf { half::bf16::from_f32(v).to_f32() } else { v };
        let mut out = vec![0f32; x.len()];
        if d > 0 {
            out.par_chunks_mut(d).zip(x.par_chunks(d)).zip(g.par_chunks(d)).for_each(|((o, xr), gr)| {
                let s = xr.iter().fold(0f32, |s, &v| v.mul_add(v, s));
                let r = 1.0 / (s / d as f32 + self.eps).sqrt();
                match self.out {
                    BwdOut::Dx => {
                        let m = xr.iter().zip(gr).zip(w.iter()).fold(0f32, |m, ((&v, &gi), &wi)| (gi * wi).mul_add(v * r, m)) / d as f32;
                        for (((o, &v), &gi), &wi) in o.iter_mut().zip(xr).zip(gr).zip(w.iter()) {
                            *o = r * (gi * wi - v * r * m);
                        }
                    }
                    BwdOut::WeightRows => {
                        for ((o, &v), &gi) in o.iter_mut().zip(xr).zip(gr) {
                            *o = gi * round(v * r);
                        }
                    }
                }
            });
        }
        let shape = l1.shape().clone();
        Ok(match (self.out, bf) {
            (BwdOut::Dx, true) => (CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()), shape),
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
        let d = *l1.dims().last().unwrap_or(&1);
        let n = l1.shape().elem_count().checked_div(d).unwrap_or(0);
        if l3.shape() != l1.shape() || l2.dims() != [d] {
            candle_core::bail!("rms norm backward: x {:?}, weight {:?}, gradient {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let out = match self.out {
            BwdOut::Dx => crate::gpu::norm::BwdOut::Dx,
            BwdOut::WeightRows => crate::gpu::norm::BwdOut::WeightRows,
        };
        Ok((crate::gpu::norm::rms_norm_bwd((s1, l1), (s2, l2), (s3, l3), (n, d), self.eps, out)?, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var, D};

    /// The composed ops (`Kernels::Autograd`) — the reference the fused op is held to.
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let xf = x.to_dtype(DType::F32).unwrap();
        let var = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let n = xf.broadcast_mul(&(var + eps).unwrap().sqrt().unwrap().recip().unwrap()).unwrap();
        n.to_dtype(x.dtype()).unwrap().broadcast_mul(w).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        (f(a) - f(b)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_rms_norm_equals_the_composed_ops_with_gradients() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (3, 5, 96), &dev).unwrap()).to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&(Tensor::randn(1f32, 0.1, 96, &dev).unwrap()).to_dtype(dtype).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1.0, (3, 5, 96), &dev).unwrap();
            let (a, b) = (super::fused(x.as_tensor(), w.as_tensor(), 1e-6).unwrap(), composed(x.as_tensor(), w.as_tensor(), 1e-6));
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(max_diff(&a, &b) < tol, "{dtype:?} forward {}", max_diff(&a, &b));
            let loss = |y: Tensor| (y.to_dtype(DType::F32).unwrap() * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (loss(a), loss(b));
            for v in [&x, &w] {
                let (p, q) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
                let scale = q.to_dtype(DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let gtol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
                assert!(max_diff(p, q) <= gtol * scale, "{dtype:?} gradient {} of {scale}", max_diff(p, q));
            }
        }
    }

    #[test]
    fn a_row_alone_equals_the_row_among_others() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (7, 64), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let w = Tensor::randn(1f32, 0.1, 64, &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let all = super::fused(&x, &w, 1e-6).unwrap();
        let one = super::fused(&x.narrow(0, 3, 1).unwrap(), &w, 1e-6).unwrap();
        assert_eq!(max_diff(&all.narrow(0, 3, 1).unwrap(), &one), 0.0);
    }

    #[test]
    fn a_weight_of_another_width_or_dtype_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        assert!(super::fused(&x, &Tensor::ones(7, DType::F32, &dev).unwrap(), 1e-6).is_err());
        assert!(super::fused(&x, &Tensor::ones(8, DType::BF16, &dev).unwrap(), 1e-6).is_err());
    }
}
