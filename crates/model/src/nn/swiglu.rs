//! The experts' SwiGLU activation as one op: gu_R2F (gate columns, then up columns, as the
//! stacked `gate_up_proj` produces them) → a_RF = silu(gate) · up, computed in f32 and rounded
//! once to gu's dtype — one launch (`gpu/kernels.cu` `moe_swiglu_*`) instead of a narrow copy,
//! a silu and a mul (two roundings). Element-wise, so a row's bits never depend on the rows
//! around it (the batch-invariance contract). The backward is one op as well
//! (`moe_swiglu_bwd_*`; on the CPU the same formula): dgate = d · up · s · (1 + g (1 − s)),
//! dup = d · silu(g), s = σ(g).
//!
//! The CPU and CUDA results differ by rounding (`exp` vs `__expf`), as every CPU / GPU pair does.
//!
//! Legend: R rows, F expert intermediate.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;

const NAME: &str = "swiglu";
const NAME_BWD: &str = "swiglu-bwd";

/// gu [R, 2F] (f32 or bf16) → silu(gu[:, ..F]) · gu[:, F..] [R, F], carrying gradients.
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let (_, f2) = gu.dims2()?;
    if f2 % 2 != 0 {
        candle_core::bail!("{NAME}: gate_up rows of {f2} columns (gate ‖ up wants an even count)");
    }
    gu.contiguous()?.apply_op1(Swiglu)
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

fn grad(g: f32, u: f32, d: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-g).exp());
    (d * u * s * (1.0 + g * (1.0 - s)), d * (g * s))
}

fn rows(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let (r, f2) = l.shape().dims2()?;
    if f2 % 2 != 0 {
        candle_core::bail!("{what}: gate_up rows of {f2} columns");
    }
    Ok((r, f2 / 2))
}

/// f32 results in `like`'s storage type.
fn out_like(like: &CpuStorage, v: Vec<f32>) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

struct Swiglu;

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, f) = rows(l, NAME)?;
        let gu = super::cpu_f32(NAME, s, l, "gate_up")?;
        let mut out = Vec::with_capacity(r * f);
        for row in gu.chunks_exact(2 * f.max(1)).take(r) {
            out.extend((0..f).map(|j| silu(row[j]) * row[f + j]));
        }
        Ok((out_like(s, out), Shape::from((r, f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (r, f) = rows(l, NAME)?;
        Ok((crate::gpu::swiglu::swiglu_storage(s, l, r, f)?, Shape::from((r, f))))
    }

    fn bwd(&self, gu: &Tensor, _res: &Tensor, d: &Tensor) -> Result<Option<Tensor>> {
        let d = d.to_dtype(gu.dtype())?.contiguous()?;
        Ok(Some(gu.apply_op2_no_bwd(&d, &SwigluBwd)?))
    }
}

/// (gu [R, 2F], da [R, F]) → dgu [R, 2F].
struct SwigluBwd;

impl CustomOp2 for SwigluBwd {
    fn name(&self) -> &'static str {
        NAME_BWD
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, f) = rows(l1, NAME_BWD)?;
        if l2.dims() != [r, f] {
            candle_core::bail!("{NAME_BWD}: gradient {:?} for gate_up {:?}", l2.dims(), l1.dims());
        }
        let gu = super::cpu_f32(NAME_BWD, s1, l1, "gate_up")?;
        let da = super::cpu_f32(NAME_BWD, s2, l2, "gradient")?;
        let mut out = vec![0f32; r * 2 * f];
        for ((row, d), o) in gu.chunks_exact(2 * f.max(1)).zip(da.chunks_exact(f.max(1))).zip(out.chunks_exact_mut(2 * f.max(1))).take(r) {
            for j in 0..f {
                let (dg, du) = grad(row[j], row[f + j], d[j]);
                o[j] = dg;
                o[f + j] = du;
            }
        }
        Ok((out_like(s1, out), Shape::from((r, 2 * f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (r, f) = rows(l1, NAME_BWD)?;
        if l2.dims() != [r, f] {
            candle_core::bail!("{NAME_BWD}: gradient {:?} for gate_up {:?}", l2.dims(), l1.dims());
        }
        Ok((crate::gpu::swiglu::swiglu_bwd_storage(s1, l1, s2, l2, r, f)?, Shape::from((r, 2 * f))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn composed(gu: &Tensor) -> Tensor {
        let f = gu.dim(1).unwrap() / 2;
        gu.narrow(1, 0, f).unwrap().silu().unwrap().mul(&gu.narrow(1, f, f).unwrap()).unwrap()
    }

    #[test]
    fn forward_and_backward_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let gu = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (7, 10), &dev).unwrap())).unwrap();
        let d = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let (a, b) = (swiglu(gu.as_tensor()).unwrap(), composed(gu.as_tensor()));
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "forward differs by {diff}");
        let ga = (a * &d).unwrap().sum_all().unwrap().backward().unwrap().get(gu.as_tensor()).unwrap().clone();
        let gb = (b * &d).unwrap().sum_all().unwrap().backward().unwrap().get(gu.as_tensor()).unwrap().clone();
        let diff = (&ga - &gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "gradient differs by {diff}");
    }

    #[test]
    fn bf16_rounds_once_and_odd_widths_are_refused() {
        let dev = Device::Cpu;
        let gu = Tensor::randn(0f32, 2.0, (3, 8), &dev).unwrap();
        let a = swiglu(&gu.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(a.dtype(), DType::BF16);
        let want = swiglu(&gu.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()).unwrap().to_dtype(DType::BF16).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&a), bits(&want));
        let err = swiglu(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap()).unwrap_err().to_string();
        assert!(err.contains("even"), "{err}");
    }
}
