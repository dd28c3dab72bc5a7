//! The backward of the batch-invariant grouped product on CUDA (`nn::invariant::grouped_bwd`):
//! y_AN = x_AK · W[e]ᵀ for expert e's `counts[e]` rows back to back, so
//!
//! - dx_AK = dy_AN · W[e]            (`Product::Nn`, one cuBLAS grouped call for every expert)
//! - dW[e]_NK = dy_eᵀ · x_e          (`Product::Tn`, one grouped call; experts without rows: 0)
//!
//! instead of two candle matmuls, a narrow and a transpose per expert, a `cat` and a `stack`.
//! The backward is not compared bitwise (only the forward must be batch-invariant), so cuBLAS
//! with f32 accumulation is the right tool: one launch per product, whatever the expert count.
//!
//! Legend: A rows (assignments), K in features, N out features, E experts.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::gemm::Product;
use super::ops::{contiguous, gemm_on};
use super::plan::RowLayout;
use super::GemmImpl;

/// Which gradient an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grad {
    /// (dy_AN, W [E, N, K]) → dx_AK
    Input,
    /// (dy_AN, x_AK) → dW [E, N, K]
    Weight,
}

struct GroupedGrad {
    layout: Arc<RowLayout>,
    grad: Grad,
    /// the weight's [E, N, K]
    enk: (usize, usize, usize),
}

impl GroupedGrad {
    fn name(&self) -> &'static str {
        match self.grad {
            Grad::Input => "grouped-matmul-nt-bwd-input",
            Grad::Weight => "grouped-matmul-nt-bwd-weight",
        }
    }

    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let name = self.name();
        let (e, n, k) = self.enk;
        let a = self.layout.rows;
        let dev = s1.device().clone();
        let dy = contiguous::<T>(s1, l1, name)?;
        let rhs = contiguous::<T>(s2, l2, name)?;
        let (product, shape) = match self.grad {
            Grad::Input => (Product::Nn, Shape::from((a, k))),
            Grad::Weight => (Product::Tn, Shape::from((e, n, k))),
        };
        // (`ops::gemm_on` zero-fills the weight gradient of experts without rows; `cuda_fwd`
        // checked dy [A, N] and the weight [E, N, K] or the rows [A, K])
        let out = gemm_on::<T>(&dev, GemmImpl::Grouped, &self.layout, product, &dy, &rhs, k, n, s1.dtype())?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

impl CustomOp2 for GroupedGrad {
    fn name(&self) -> &'static str {
        GroupedGrad::name(self)
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: CUDA only (the CPU backward is nn::invariant::grouped_bwd's loop)", GroupedGrad::name(self))
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let name = GroupedGrad::name(self);
        let (e, n, k) = self.enk;
        let a = self.layout.rows;
        let want2 = match self.grad {
            Grad::Input => vec![e, n, k],
            Grad::Weight => vec![a, k],
        };
        if l1.dims() != [a, n] || l2.dims() != want2.as_slice() {
            candle_core::bail!("{name}: dy {:?} (want [{a}, {n}]) and {:?} (want {want2:?})", l1.dims(), l2.dims());
        }
        if s1.dtype() != s2.dtype() {
            candle_core::bail!("{name}: dy {:?} and {:?} must share a dtype", s1.dtype(), s2.dtype());
        }
        match s1.dtype() {
            DType::BF16 => self.run::<bf16>(s1, l1, s2, l2),
            DType::F32 => self.run::<f32>(s1, l1, s2, l2),
            other => candle_core::bail!("{name}: dtype {other:?} (bf16 or f32)"),
        }
    }
}

/// (x_AK, w [E, N, K], dy_AN, `counts[e]` rows of expert e back to back) → (dx_AK, dW [E, N, K])
/// in w's dtype, two cuBLAS grouped GEMMs.
pub(crate) fn grouped_bwd(x: &Tensor, w: &Tensor, g: &Tensor, counts: &[usize]) -> Result<(Tensor, Tensor)> {
    let (e, n, k) = w.dims3()?;
    let (a, k2) = x.dims2()?;
    if counts.len() != e || counts.iter().sum::<usize>() != a || k2 != k {
        candle_core::bail!("grouped-matmul-nt-bwd: x {:?}, w {:?}, {} counts summing to {}", x.dims(), w.dims(), counts.len(), counts.iter().sum::<usize>());
    }
    let (layout, _) = RowLayout::new(counts.to_vec(), GemmImpl::Grouped);
    let layout = Arc::new(layout);
    let dtype = w.dtype();
    let dy = g.to_dtype(dtype)?.contiguous()?;
    let op = |grad| GroupedGrad { layout: layout.clone(), grad, enk: (e, n, k) };
    let dx = dy.apply_op2_no_bwd(&w.contiguous()?, &op(Grad::Input))?;
    let dw = dy.apply_op2_no_bwd(&x.to_dtype(dtype)?.contiguous()?, &op(Grad::Weight))?;
    Ok((dx.to_dtype(x.dtype())?, dw))
}
