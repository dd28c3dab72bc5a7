//! The Gumbel-max draw on the device (`sample.cu`; `crate::gumbel` defines it): one launch for
//! every row of a step's logits, only the [R] token ids left to copy back.
//!
//! Legend: R rows, V vocabulary.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

use super::sample_func;

/// [R] u32 tokens of the contiguous f32 logits [R, V], row r drawn with `rows[r]` = (key, T).
pub(crate) fn gumbel_argmax(s: &CudaStorage, l: &Layout, rows: &[(u64, f32)]) -> Result<(CudaStorage, Shape)> {
    let (r, v) = l.shape().dims2()?;
    if s.dtype() != DType::F32 {
        candle_core::bail!("gumbel sample: logits must be f32, got {:?}", s.dtype());
    }
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("gumbel sample: logits must be contiguous") };
    if rows.len() != r || r > 65535 || v > u32::MAX as usize {
        candle_core::bail!("gumbel sample: {r} rows of {v} logits with {} keys (at most 65535 rows)", rows.len());
    }
    let dev = s.device().clone();
    // SAFETY: uninitialised, but the launch writes out[row] for every row < R (thread 0 of each
    // of the R blocks); R = 0: never read.
    let mut out = unsafe { dev.alloc::<u32>(r.max(1))? };
    if r > 0 {
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        let keys = dev.clone_htod(&rows.iter().map(|k| k.0).collect::<Vec<u64>>())?;
        let temps = dev.clone_htod(&rows.iter().map(|k| k.1).collect::<Vec<f32>>())?;
        let v32 = v as u32;
        let f = sample_func(&dev, "gumbel_argmax_f32")?;
        let mut bld = f.builder();
        bld.arg(&x).arg(&v32).arg(&keys).arg(&temps).arg(&mut out);
        let cfg = LaunchConfig { grid_dim: (r as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `gumbel_argmax_f32(logits, V, keys, temps, out)`
        // (sample.cu) in order: x is the contiguous [R, V] f32 input (dtype and layout checked),
        // keys and temps hold R entries, out R. One block per row (R <= 65535 checked), 1024
        // threads: the kernel's launch bound and the size of its shared arrays; it reads x[row ·
        // V + i] for i < V only.
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(r)))
}
