//! The CUDA side of `crate::nn::swiglu`: the `moe_swiglu_*` / `moe_swiglu_bwd_*` kernels of
//! `kernels.cu` (launched by `ops`) on candle storage.
//!
//! Legend: R rows, F expert intermediate.

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout, Result};
use half::bf16;

use super::ops::{contiguous, suffix, swiglu, swiglu_bwd};

/// gu [R, 2F] (contiguous view) → silu(gate) · up [R, F].
pub(crate) fn swiglu_storage(s: &CudaStorage, l: &Layout, r: usize, f: usize) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let suf = suffix(s.dtype(), "swiglu")?;
    Ok(match s.dtype() {
        DType::BF16 => CudaStorage::wrap_cuda_slice(swiglu::<bf16>(&dev, &contiguous::<bf16>(s, l, "swiglu")?, r, f, suf)?, dev),
        _ => CudaStorage::wrap_cuda_slice(swiglu::<f32>(&dev, &contiguous::<f32>(s, l, "swiglu")?, r, f, suf)?, dev),
    })
}

/// (gu [R, 2F], da [R, F]) (contiguous views, one dtype) → dgu [R, 2F].
pub(crate) fn swiglu_bwd_storage(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, r: usize, f: usize) -> Result<CudaStorage> {
    let dev = s1.device().clone();
    if s1.dtype() != s2.dtype() {
        candle_core::bail!("swiglu-bwd: gate_up {:?} with gradient {:?}", s1.dtype(), s2.dtype());
    }
    let suf = suffix(s1.dtype(), "swiglu-bwd")?;
    Ok(match s1.dtype() {
        DType::BF16 => {
            let (gu, da) = (contiguous::<bf16>(s1, l1, "swiglu-bwd")?, contiguous::<bf16>(s2, l2, "swiglu-bwd")?);
            CudaStorage::wrap_cuda_slice(swiglu_bwd::<bf16>(&dev, &gu, &da, r, f, suf)?, dev)
        }
        _ => {
            let (gu, da) = (contiguous::<f32>(s1, l1, "swiglu-bwd")?, contiguous::<f32>(s2, l2, "swiglu-bwd")?);
            CudaStorage::wrap_cuda_slice(swiglu_bwd::<f32>(&dev, &gu, &da, r, f, suf)?, dev)
        }
    })
}
