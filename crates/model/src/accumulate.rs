//! In-place f32 gradient sums: `acc += g` for an f32 accumulator and an f32 or bf16 gradient,
//! as a candle in-place op, on the CPU and on CUDA (`gpu/accumulate.cu`).
//!
//! `acc + g.to_dtype(F32)` costs a conversion kernel and a fresh f32 tensor per parameter per
//! micro-batch; [`add_into`] reads acc and g once and writes acc once, with exactly the same
//! bits: widening bf16 to f32 is exact, and each element is one correctly rounded f32 add,
//! `acc[i] + g[i]` in that order (no fused multiply-add, no reassociation, no wider
//! intermediate), on either device.
//!
//! Legend: n elements (acc and g of one shape).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Why an in-place sum was refused: each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccumulateError {
    /// The accumulator is not f32.
    #[error("accumulate: acc is {0:?}, expected f32")]
    AccDtype(DType),
    /// The gradient is neither f32 nor bf16.
    #[error("accumulate: g is {0:?}, expected f32 or bf16")]
    GradDtype(DType),
    /// acc and g differ in shape.
    #[error("accumulate: acc of shape {acc:?} and g of shape {g:?} differ")]
    Shape { acc: Shape, g: Shape },
    /// acc is a strided view: it is written in place, so it must be contiguous (a start
    /// offset is fine).
    #[error("accumulate: acc of shape {shape:?} with strides {stride:?} is not contiguous (it is written in place)")]
    NotContiguous { shape: Shape, stride: Vec<usize> },
    /// acc and g live on different devices.
    #[error("accumulate: acc on {acc}, g on {g}")]
    Device { acc: String, g: String },
}

impl From<AccumulateError> for candle_core::Error {
    fn from(e: AccumulateError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Elements per rayon task on the CPU (and the size below which one thread does it all).
const CPU_CHUNK: usize = 1 << 16;

/// acc += g, in place (`acc` the destination of `Tensor::inplace_op2`).
struct AddInto;

/// acc[i] = acc[i] + widen(g[i]) over equal-length slices, in chunks across rayon's threads
/// (each element's add is independent: the split changes no bits).
fn add_slices<G: Copy + Send + Sync>(acc: &mut [f32], g: &[G], widen: impl Fn(G) -> f32 + Send + Sync) {
    let serial = |a: &mut [f32], g: &[G]| {
        for (a, &g) in a.iter_mut().zip(g) {
            *a += widen(g);
        }
    };
    if acc.len() <= CPU_CHUNK {
        serial(acc, g);
    } else {
        acc.par_chunks_mut(CPU_CHUNK).zip(g.par_chunks(CPU_CHUNK)).for_each(|(a, g)| serial(a, g));
    }
}

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "accumulate"
    }

    fn cpu_fwd(&self, acc: &mut CpuStorage, la: &Layout, g: &CpuStorage, lg: &Layout) -> candle_core::Result<()> {
        let Some((a0, a1)) = la.contiguous_offsets() else {
            return Err(AccumulateError::NotContiguous { shape: la.shape().clone(), stride: la.stride().to_vec() }.into());
        };
        let Some((g0, g1)) = lg.contiguous_offsets() else { candle_core::bail!("accumulate: g must be contiguous here (add_into makes it so)") };
        if a1 - a0 != g1 - g0 {
            return Err(AccumulateError::Shape { acc: la.shape().clone(), g: lg.shape().clone() }.into());
        }
        match (acc, g) {
            (CpuStorage::F32(a), CpuStorage::F32(g)) => add_slices(&mut a[a0..a1], &g[g0..g1], |x: f32| x),
            (CpuStorage::F32(a), CpuStorage::BF16(g)) => add_slices(&mut a[a0..a1], &g[g0..g1], bf16::to_f32),
            (CpuStorage::F32(_), g) => return Err(AccumulateError::GradDtype(g.dtype()).into()),
            (a, _) => return Err(AccumulateError::AccDtype(a.dtype()).into()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, acc: &mut candle_core::CudaStorage, la: &Layout, g: &candle_core::CudaStorage, lg: &Layout) -> candle_core::Result<()> {
        crate::gpu::accumulate::add_into(acc, la, g, lg)
    }
}

/// The checks of [`add_into`], without the sum: acc f32 and contiguous (a start offset is
/// fine), g f32 or bf16 of acc's shape, both on one device.
pub fn check(acc: &Tensor, g: &Tensor) -> Result<(), AccumulateError> {
    if acc.dtype() != DType::F32 {
        return Err(AccumulateError::AccDtype(acc.dtype()));
    }
    if !matches!(g.dtype(), DType::F32 | DType::BF16) {
        return Err(AccumulateError::GradDtype(g.dtype()));
    }
    if acc.shape() != g.shape() {
        return Err(AccumulateError::Shape { acc: acc.shape().clone(), g: g.shape().clone() });
    }
    if !acc.is_contiguous() {
        return Err(AccumulateError::NotContiguous { shape: acc.shape().clone(), stride: acc.stride().to_vec() });
    }
    if !acc.device().same_device(g.device()) {
        return Err(AccumulateError::Device { acc: format!("{:?}", acc.device().location()), g: format!("{:?}", g.device().location()) });
    }
    Ok(())
}

/// acc += g in place: acc [n] f32, contiguous (a narrow with a start offset is fine); g of
/// acc's shape, f32 or bf16, any layout (made contiguous first). The bits of
/// `acc + g.to_dtype(F32)`. No autograd: acc must be a tensor nobody else reads as its old
/// value (a fresh accumulator, not a parameter's gradient or a view shared with others), and g
/// must not share acc's storage (refused by candle).
pub fn add_into(acc: &Tensor, g: &Tensor) -> candle_core::Result<()> {
    check(acc, g)?;
    if acc.elem_count() == 0 {
        return Ok(());
    }
    acc.inplace_op2(&g.contiguous()?, &AddInto)
}
