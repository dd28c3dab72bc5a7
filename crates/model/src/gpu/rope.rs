//! Launch of `rope.cu`: the rotary embedding in one kernel (the CUDA side of `crate::nn::rope`).
//!
//! Legend: B rows, n heads, T slots, Dh head dim, R rotary dim.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

use super::ops::contiguous;
use super::rope_func;

const THREADS: u32 = 256;

type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn launch<T: CudaDType + DeviceRepr>((sx, lx): Arg, (sc, lc): Arg, (ss, ls): Arg, (b, n, t, dh, r): (usize, usize, usize, usize, usize), name: &'static str, token_major: bool) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let (x, c, s) = (contiguous::<T>(sx, lx, "rope x")?, contiguous::<T>(sc, lc, "rope cos")?, contiguous::<T>(ss, ls, "rope sin")?);
    let total = b * n * t * dh;
    // SAFETY: uninitialised, but the launch writes every one of the `total` elements (one
    // thread each); total = 0 returns a never-read buffer.
    let mut out = unsafe { dev.alloc::<T>(total.max(1))? };
    if total > 0 {
        let blocks = u32::try_from(total.div_ceil(THREADS as usize)).map_err(|_| candle_core::Error::Msg("rope: too many elements".into()))?;
        let u32_of = |v: usize, what: &str| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("rope: {what} = {v} exceeds u32")));
        let (total64, n32, t32, dh32, r32) = (total as u64, u32_of(n, "heads")?, u32_of(t, "slots")?, u32_of(dh, "head dim")?, u32_of(r, "rotary dim")?);
        let f = rope_func(&dev, name)?;
        let mut bl = f.builder();
        let tm = u32::from(token_major);
        bl.arg(&x).arg(&c).arg(&s).arg(&mut out).arg(&total64).arg(&n32).arg(&t32).arg(&dh32).arg(&r32).arg(&tm);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `rope_<dtype>(x, cos, sin, out, total, heads, T, Dh,
        // R, token_major)` (or `rope_bwd_<dtype>`, the same signature with x the output's gradient) in order,
        // T its element type: x is the contiguous [B, n, T, Dh] (or [B, T, n, Dh] when
        // token_major: the same element count and table rows b · T + t), cos and sin the contiguous
        // [B, 1, T, R] with R <= Dh and R even (checked by the op), out holds total = B · n · T ·
        // Dh; threads past total return at once, and a thread reads x only at i ± R/2 for its
        // channel i < R, inside its own row.
        unsafe { bl.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// x [B, n, T, Dh] rotated by cos, sin [B, 1, T, R] (f32 or bf16, all one dtype); `backward`:
/// x is the output's gradient and the result the input's (`rope_bwd_*`); `token_major`: x is
/// [B, T, n, Dh].
pub(crate) fn rope(x: Arg, c: Arg, s: Arg, dims: (usize, usize, usize, usize, usize), backward: bool, token_major: bool) -> Result<(CudaStorage, Shape)> {
    let shape = x.1.shape().clone();
    let out = match (x.0.dtype(), c.0.dtype(), s.0.dtype(), backward) {
        (DType::F32, DType::F32, DType::F32, false) => launch::<f32>(x, c, s, dims, "rope_f32", token_major)?,
        (DType::BF16, DType::BF16, DType::BF16, false) => launch::<bf16>(x, c, s, dims, "rope_bf16", token_major)?,
        (DType::F32, DType::F32, DType::F32, true) => launch::<f32>(x, c, s, dims, "rope_bwd_f32", token_major)?,
        (DType::BF16, DType::BF16, DType::BF16, true) => launch::<bf16>(x, c, s, dims, "rope_bwd_bf16", token_major)?,
        (a, b, d, _) => candle_core::bail!("rope: x {a:?}, cos {b:?}, sin {d:?} (f32 or bf16, all the same)"),
    };
    Ok((out, shape))
}
