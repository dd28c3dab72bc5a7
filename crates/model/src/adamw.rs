//! The AdamW update as four in-place element-wise ops, on the CPU and on CUDA (`gpu/adamw.cu`):
//!
//! 1. [`moment1_into`]: m ← m·β₁ + g'·(1 − β₁)
//! 2. [`moment2_into`]: v ← v·β₂ + g'²·(1 − β₂)
//! 3. [`theta_into`]:   θ ← θ − lr·((m/c₁) / (√(v/c₂) + ε) + wd·θ)
//! 4. [`cast_into`]:    p ← θ rounded to p's dtype (the bf16 copy of an f32 master)
//!
//! with g' = g·s (s the clip factor, applied only when s < 1). Each op reads its inputs once and
//! writes its destination in place: 46 bytes per parameter for a bf16 weight with an f32 master,
//! against ~15 kernels and as many fresh f32 tensors for the same update composed of candle ops
//! (`lockstep_trainer::optim::StepHyper::update`, kept as the reference).
//!
//! **The bits of the composed ops.** Every step is one correctly rounded f32 operation in the
//! order candle's ops take: a scalar product `x * c` is candle's `affine(c, 0)`, i.e. `x·c + 0`
//! (the `+ 0` turns −0 into +0, so it is kept), a division by a scalar is `affine(1/c, 0)` with
//! 1/c rounded once in f64 then to f32, `+ ε` is `affine(1, ε)`, √ and ÷ are IEEE. The scalars
//! are those f32 values ([`AdamWScalars::new`]); no fused multiply-add, no reassociation, on
//! either device, so the fused update has exactly the composed update's bits (tests).
//!
//! Legend: n elements of one parameter (every operand of one op has n, contiguous).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Why an update op was refused: each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdamWError {
    /// An operand that must be f32 is not.
    #[error("adamw: {what} is {dtype:?}, expected f32")]
    Dtype { what: &'static str, dtype: DType },
    /// The parameter written by `cast_into` is neither f32 nor bf16.
    #[error("adamw: parameter is {0:?}, expected f32 or bf16")]
    ParamDtype(DType),
    /// Operands of one op differ in element count.
    #[error("adamw: {what} holds {got} elements, expected {want}")]
    Len { what: &'static str, got: usize, want: usize },
    /// An operand is a strided view (the destination is written in place; every operand is read
    /// as one run of elements).
    #[error("adamw: {0} is not contiguous")]
    NotContiguous(&'static str),
    /// Operands on different devices.
    #[error("adamw: {what} on {got}, destination on {want}")]
    Device { what: &'static str, got: String, want: String },
}

impl From<AdamWError> for candle_core::Error {
    fn from(e: AdamWError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// The f32 scalars of one AdamW step, rounded as candle's scalar ops round them ([module
/// doc](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// the clip factor, None when the gradient is not scaled (factor ≥ 1)
    pub scale: Option<f32>,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// 1 / (1 − β₁ᵗ), 1 / (1 − β₂ᵗ)
    pub inv_c1: f32,
    pub inv_c2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub lr: f32,
}

impl AdamWScalars {
    /// From the f64 hyper-parameters of a step: clip factor, β₁, β₂, bias corrections c₁ = 1 − β₁ᵗ
    /// and c₂ = 1 − β₂ᵗ, ε, weight decay, learning rate.
    #[allow(clippy::too_many_arguments)]
    pub fn new(scale: f64, beta1: f64, beta2: f64, c1: f64, c2: f64, eps: f64, weight_decay: f64, lr: f64) -> Self {
        Self {
            scale: (scale < 1.0).then_some(scale as f32),
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inv_c1: (1.0 / c1) as f32,
            inv_c2: (1.0 / c2) as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            lr: lr as f32,
        }
    }

    /// The kernels' `Scalars` (`gpu/adamw.cu`).
    #[cfg(feature = "cuda")]
    fn kernel(&self) -> crate::gpu::adamw::Scalars {
        crate::gpu::adamw::Scalars {
            scale: self.scale.unwrap_or(1.0),
            beta1: self.beta1,
            one_minus_beta1: self.one_minus_beta1,
            beta2: self.beta2,
            one_minus_beta2: self.one_minus_beta2,
            inv_c1: self.inv_c1,
            inv_c2: self.inv_c2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            lr: self.lr,
            has_scale: i32::from(self.scale.is_some()),
        }
    }

    /// g' = g·s (candle's `affine(s, 0)`), or g.
    #[inline]
    pub fn clipped(&self, g: f32) -> f32 {
        match self.scale {
            Some(s) => g * s + 0.0,
            None => g,
        }
    }

    /// The new first moment (`first`: no previous one).
    #[inline]
    pub fn m1(&self, m: f32, g: f32, first: bool) -> f32 {
        let t = self.clipped(g) * self.one_minus_beta1 + 0.0;
        if first {
            t
        } else {
            (m * self.beta1 + 0.0) + t
        }
    }

    /// The new second moment (`first`: no previous one).
    #[inline]
    pub fn m2(&self, v: f32, g: f32, first: bool) -> f32 {
        let g = self.clipped(g);
        let t = (g * g) * self.one_minus_beta2 + 0.0;
        if first {
            t
        } else {
            (v * self.beta2 + 0.0) + t
        }
    }

    /// The new weight from the weight and the new moments.
    #[inline]
    pub fn theta(&self, theta: f32, m: f32, v: f32) -> f32 {
        let num = m * self.inv_c1 + 0.0;
        let den = (v * self.inv_c2 + 0.0).sqrt() * 1.0 + self.eps;
        let u = num / den + (theta * self.weight_decay + 0.0);
        theta - (u * self.lr + 0.0)
    }
}

/// Elements per rayon task on the CPU (and the size below which one thread does it all).
const CPU_CHUNK: usize = 1 << 15;

fn contiguous_range(l: &Layout, what: &'static str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| AdamWError::NotContiguous(what).into())
}

fn f32_of<'a>(s: &'a CpuStorage, l: &Layout, what: &'static str, n: usize) -> candle_core::Result<&'a [f32]> {
    let (a, b) = contiguous_range(l, what)?;
    if b - a != n {
        return Err(AdamWError::Len { what, got: b - a, want: n }.into());
    }
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        other => Err(AdamWError::Dtype { what, dtype: other.dtype() }.into()),
    }
}

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &'static str) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = contiguous_range(l, what)?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        other => Err(AdamWError::Dtype { what, dtype: other.dtype() }.into()),
    }
}

/// dst[i] = f(dst[i], i) over chunks across rayon's threads (each element independent: the
/// split changes no bits).
fn map_chunks<T: Send>(dst: &mut [T], f: impl Fn(&mut T, usize) + Send + Sync) {
    if dst.len() <= CPU_CHUNK {
        dst.iter_mut().enumerate().for_each(|(i, d)| f(d, i));
    } else {
        dst.par_chunks_mut(CPU_CHUNK).enumerate().for_each(|(c, chunk)| {
            for (j, d) in chunk.iter_mut().enumerate() {
                f(d, c * CPU_CHUNK + j);
            }
        });
    }
}

/// Which moment an [`Moment`] op updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    First,
    Second,
}

/// m (or v) updated in place from g: the destination of `Tensor::inplace_op2`.
struct Moment {
    which: Which,
    first: bool,
    s: AdamWScalars,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, ld: &Layout, g: &CpuStorage, lg: &Layout) -> candle_core::Result<()> {
        let d = f32_mut(dst, ld, "moment")?;
        let g = f32_of(g, lg, "g", d.len())?;
        let (s, first) = (self.s, self.first);
        match self.which {
            Which::First => map_chunks(d, |m, i| *m = s.m1(*m, g[i], first)),
            Which::Second => map_chunks(d, |v, i| *v = s.m2(*v, g[i], first)),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, ld: &Layout, g: &candle_core::CudaStorage, lg: &Layout) -> candle_core::Result<()> {
        crate::gpu::adamw::moment(dst, ld, g, lg, self.s.kernel(), self.which == Which::Second, self.first)
    }
}

/// θ updated in place from the new m and v: the destination of `Tensor::inplace_op3`.
struct Theta(AdamWScalars);

impl InplaceOp3 for Theta {
    fn name(&self) -> &'static str {
        "adamw-theta"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, ld: &Layout, m: &CpuStorage, lm: &Layout, v: &CpuStorage, lv: &Layout) -> candle_core::Result<()> {
        let d = f32_mut(dst, ld, "theta")?;
        let m = f32_of(m, lm, "m", d.len())?;
        let v = f32_of(v, lv, "v", d.len())?;
        let s = self.0;
        map_chunks(d, |t, i| *t = s.theta(*t, m[i], v[i]));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        ld: &Layout,
        m: &candle_core::CudaStorage,
        lm: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<()> {
        crate::gpu::adamw::theta(dst, ld, m, lm, v, lv, self.0.kernel())
    }
}

/// The parameter (f32 or bf16) overwritten with θ rounded to its dtype.
struct CastInto;

impl InplaceOp2 for CastInto {
    fn name(&self) -> &'static str {
        "adamw-cast"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, ld: &Layout, theta: &CpuStorage, lt: &Layout) -> candle_core::Result<()> {
        let (a, b) = contiguous_range(ld, "parameter")?;
        let t = f32_of(theta, lt, "theta", b - a)?;
        match dst {
            CpuStorage::F32(p) => map_chunks(&mut p[a..b], |p, i| *p = t[i]),
            CpuStorage::BF16(p) => map_chunks(&mut p[a..b], |p, i| *p = bf16::from_f32(t[i])),
            other => return Err(AdamWError::ParamDtype(other.dtype()).into()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, ld: &Layout, theta: &candle_core::CudaStorage, lt: &Layout) -> candle_core::Result<()> {
        crate::gpu::adamw::cast(dst, ld, theta, lt)
    }
}

/// The checks every op makes before it runs: `dst` contiguous, each operand contiguous, f32
/// (`dst` too unless `param`), of `dst`'s element count, on `dst`'s device.
fn check(dst: &Tensor, what: &'static str, param: bool, operands: &[(&'static str, &Tensor)]) -> Result<(), AdamWError> {
    if param {
        if !matches!(dst.dtype(), DType::F32 | DType::BF16) {
            return Err(AdamWError::ParamDtype(dst.dtype()));
        }
    } else if dst.dtype() != DType::F32 {
        return Err(AdamWError::Dtype { what, dtype: dst.dtype() });
    }
    if !dst.is_contiguous() {
        return Err(AdamWError::NotContiguous(what));
    }
    for &(name, t) in operands {
        if t.dtype() != DType::F32 {
            return Err(AdamWError::Dtype { what: name, dtype: t.dtype() });
        }
        if t.elem_count() != dst.elem_count() {
            return Err(AdamWError::Len { what: name, got: t.elem_count(), want: dst.elem_count() });
        }
        if !t.is_contiguous() {
            return Err(AdamWError::NotContiguous(name));
        }
        if !t.device().same_device(dst.device()) {
            return Err(AdamWError::Device { what: name, got: format!("{:?}", t.device().location()), want: format!("{:?}", dst.device().location()) });
        }
    }
    Ok(())
}

/// m ← m·β₁ + g'·(1 − β₁) in place (`first`: m's old value is ignored, m = g'·(1 − β₁)). m and g
/// f32, contiguous, of one element count. No autograd.
pub fn moment1_into(m: &Tensor, g: &Tensor, s: &AdamWScalars, first: bool) -> candle_core::Result<()> {
    check(m, "m", false, &[("g", g)])?;
    if m.elem_count() == 0 {
        return Ok(());
    }
    m.inplace_op2(g, &Moment { which: Which::First, first, s: *s })
}

/// v ← v·β₂ + g'²·(1 − β₂) in place (`first`: v's old value is ignored). As [`moment1_into`].
pub fn moment2_into(v: &Tensor, g: &Tensor, s: &AdamWScalars, first: bool) -> candle_core::Result<()> {
    check(v, "v", false, &[("g", g)])?;
    if v.elem_count() == 0 {
        return Ok(());
    }
    v.inplace_op2(g, &Moment { which: Which::Second, first, s: *s })
}

/// θ ← θ − lr·((m/c₁) / (√(v/c₂) + ε) + wd·θ) in place, from the *new* moments. θ, m, v f32,
/// contiguous, of one element count. No autograd.
pub fn theta_into(theta: &Tensor, m: &Tensor, v: &Tensor, s: &AdamWScalars) -> candle_core::Result<()> {
    check(theta, "theta", false, &[("m", m), ("v", v)])?;
    if theta.elem_count() == 0 {
        return Ok(());
    }
    theta.inplace_op3(m, v, &Theta(*s))
}

/// The parameter `p` (f32 or bf16, contiguous) overwritten in place with θ (f32) rounded to
/// p's dtype — the bits of `θ.to_dtype(p.dtype())` (round to nearest even). No autograd.
pub fn cast_into(p: &Tensor, theta: &Tensor) -> candle_core::Result<()> {
    check(p, "parameter", true, &[("theta", theta)])?;
    if p.elem_count() == 0 {
        return Ok(());
    }
    p.inplace_op2(theta, &CastInto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn refusals_name_the_operand() {
        let dev = Device::Cpu;
        let s = AdamWScalars::new(1.0, 0.9, 0.999, 0.1, 0.001, 1e-8, 0.01, 1e-3);
        let m = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let short = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let half = Tensor::zeros(4, DType::BF16, &dev).unwrap();
        let err = |r: candle_core::Result<()>| r.unwrap_err().to_string();
        assert!(err(moment1_into(&m, &short, &s, false)).contains("g holds 3 elements, expected 4"));
        assert!(err(moment2_into(&half, &m, &s, false)).contains("v is BF16"));
        assert!(err(theta_into(&m, &m.clone(), &half, &s)).contains("v is BF16"));
        let strided = Tensor::zeros((2, 4), DType::F32, &dev).unwrap().t().unwrap();
        assert!(err(cast_into(&strided, &Tensor::zeros((4, 2), DType::F32, &dev).unwrap())).contains("parameter is not contiguous"));
        assert!(err(cast_into(&Tensor::zeros(4, DType::U32, &dev).unwrap(), &m)).contains("parameter is U32"));
    }
}
