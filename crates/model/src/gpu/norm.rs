//! Launch of `norm.cu`: the RMSNorm forward and backward, one warp a row (the CUDA side of
//! `crate::nn::norm`).
//!
//! Legend: N rows, D row width.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

use super::norm_func;
use super::ops::contiguous;

const THREADS: u32 = 128;
const ROWS_PER_BLOCK: usize = 4;
/// The most blocks a launch takes (16 an SM of an H200's 132); the kernels stride their warps
/// over the rows beyond (an 8,192-token prefill's q norm has 262,144 rows: 65,536 blocks of four
/// 128-wide rows cost more to schedule than to run).
const MAX_BLOCKS: usize = 2048;

/// The grid of a launch over `n` rows: ⌈N / 4⌉ blocks of 4 warps, at most MAX_BLOCKS.
fn blocks(n: usize) -> u32 {
    n.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS) as u32
}

fn launch<T: CudaDType + DeviceRepr>(sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, (n, d): (usize, usize), eps: f32, name: &'static str) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let (x, w) = (contiguous::<T>(sx, lx, "rms norm x")?, contiguous::<T>(sw, lw, "rms norm weight")?);
    // SAFETY: uninitialised, but the launch writes out[row, 0..D] for every row < N (one warp
    // per row); N · D = 0 returns a never-read buffer.
    let mut out = unsafe { dev.alloc::<T>((n * d).max(1))? };
    if n * d > 0 {
        let u32_of = |v: usize, what: &str| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("rms norm: {what} = {v} exceeds u32")));
        let (n32, d32) = (u32_of(n, "rows")?, u32_of(d, "row width")?);
        let f = norm_func(&dev, name)?;
        let mut b = f.builder();
        b.arg(&x).arg(&w).arg(&mut out).arg(&n32).arg(&d32).arg(&eps);
        let cfg = LaunchConfig { grid_dim: (blocks(n), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `rms_norm_<dtype>(x, w, out, rows, d, eps)` in
        // order, T its element type: x is the contiguous [N, D] input, w the contiguous [D]
        // weight (the op checked both shapes and dtypes), out holds N · D. Blocks of 4 warps
        // (THREADS, the launch bound) whose warps take rows warp, warp + 4 · blocks, … below N.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// x [N, D] (contiguous view), w [D] → [N, D] in x's dtype (f32 or bf16; w the same dtype).
pub(crate) fn rms_norm(sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, (n, d): (usize, usize), eps: f32) -> Result<(CudaStorage, Shape)> {
    let shape = lx.shape().clone();
    let out = match (sx.dtype(), sw.dtype()) {
        (DType::F32, DType::F32) => launch::<f32>(sx, lx, sw, lw, (n, d), eps, "rms_norm_f32")?,
        (DType::BF16, DType::BF16) => launch::<bf16>(sx, lx, sw, lw, (n, d), eps, "rms_norm_bf16")?,
        (a, b) => candle_core::bail!("rms norm: x {a:?} with weight {b:?} (f32 or bf16, both the same)"),
    };
    Ok((out, shape))
}

/// The engine's residual add and the norm after it in one launch (`add_rms_norm_*`): a, b [N, D]
/// (contiguous views, one dtype: f32 or bf16), w [D], D <= 2048 → [2, N, D]: s = a + b in the
/// dtype (candle's add's bits), then rms_norm(s) (this module's kernel's bits).
pub(crate) fn add_rms_norm(a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout), (n, d): (usize, usize), eps: f32) -> Result<(CudaStorage, Shape)> {
    if d > 2048 {
        candle_core::bail!("add + rms norm: rows of {d} (at most 2048)");
    }
    fn go<T: CudaDType + DeviceRepr>(a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout), (n, d): (usize, usize), eps: f32, name: &'static str) -> Result<CudaStorage> {
        let dev = a.0.device().clone();
        let (av, bv, wv) = (contiguous::<T>(a.0, a.1, "add + rms norm a")?, contiguous::<T>(b.0, b.1, "add + rms norm b")?, contiguous::<T>(w.0, w.1, "add + rms norm weight")?);
        // SAFETY: uninitialised, but the launch writes s and the normalised row of every row < N
        // (a warp a row, all D lanes); N · D = 0 returns a never-read buffer.
        let mut out = unsafe { dev.alloc::<T>((2 * n * d).max(1))? };
        if n * d > 0 {
            let u32_of = |v: usize, what: &str| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("add + rms norm: {what} = {v} exceeds u32")));
            let (n32, d32) = (u32_of(n, "rows")?, u32_of(d, "row width")?);
            let f = norm_func(&dev, name)?;
            let mut bl = f.builder();
            bl.arg(&av).arg(&bv).arg(&wv).arg(&mut out).arg(&n32).arg(&d32).arg(&eps);
            let cfg = LaunchConfig { grid_dim: (blocks(n), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments are those of `add_rms_norm_<dtype>(a, b, w, out, rows, d,
            // eps)` in order, T its element type: a and b the contiguous [N, D] inputs, w the
            // contiguous [D] weight (the op checked shapes and dtypes), out holds 2 · N · D (the
            // sums, then the normalised rows), D <= 2048 (checked: the kernel's register rows).
            // Blocks of 4 warps (THREADS, the launch bound) striding over the rows below N.
            unsafe { bl.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    let out = match (a.0.dtype(), b.0.dtype(), w.0.dtype()) {
        (DType::F32, DType::F32, DType::F32) => go::<f32>(a, b, w, (n, d), eps, "add_rms_norm_f32")?,
        (DType::BF16, DType::BF16, DType::BF16) => go::<bf16>(a, b, w, (n, d), eps, "add_rms_norm_bf16")?,
        (x, y, z) => candle_core::bail!("add + rms norm: a {x:?}, b {y:?}, weight {z:?} (f32 or bf16, all the same)"),
    };
    Ok((out, Shape::from((2, n, d))))
}

/// Which output of the backward kernel a launch writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BwdOut {
    /// dx [N, D] in x's dtype
    Dx,
    /// g · round(x · r) [N, D] f32 (the weight gradient's rows: dw = their sum)
    WeightRows,
}

fn launch_bwd<T: CudaDType + DeviceRepr>(
    (sx, lx): (&CudaStorage, &Layout),
    (sw, lw): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    (n, d): (usize, usize),
    eps: f32,
    out: BwdOut,
    name: &'static str,
) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let x = contiguous::<T>(sx, lx, "rms norm backward x")?;
    let w = contiguous::<T>(sw, lw, "rms norm backward weight")?;
    let g = contiguous::<T>(sg, lg, "rms norm backward gradient")?;
    let u32_of = |v: usize, what: &str| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("rms norm backward: {what} = {v} exceeds u32")));
    let (n32, d32) = (u32_of(n, "rows")?, u32_of(d, "row width")?);
    let cfg = LaunchConfig { grid_dim: (blocks(n), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let null = 0u64;
    let f = norm_func(&dev, name)?;
    Ok(match out {
        BwdOut::Dx => {
            // SAFETY: uninitialised, but the launch writes dx[row, 0..D] for every row < N.
            let mut dx = unsafe { dev.alloc::<T>((n * d).max(1))? };
            if n * d > 0 {
                let mut b = f.builder();
                b.arg(&x).arg(&w).arg(&g).arg(&mut dx).arg(&null).arg(&n32).arg(&d32).arg(&eps);
                // SAFETY: the arguments are those of `rms_norm_bwd_<dtype>(x, w, g, dx, pw, rows,
                // d, eps)` in order, T its element type: x and g the contiguous [N, D] input and
                // output gradient, w the [D] weight (the op checked shapes and dtypes), dx holds
                // N · D, pw a null pointer (a 0u64, pointer-sized; the kernel skips it). Blocks
                // of 4 warps striding over the rows below N.
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(dx, dev)
        }
        BwdOut::WeightRows => {
            // SAFETY: uninitialised, but the launch writes pw[row, 0..D] for every row < N.
            let mut pw = unsafe { dev.alloc::<f32>((n * d).max(1))? };
            if n * d > 0 {
                let mut b = f.builder();
                b.arg(&x).arg(&w).arg(&g).arg(&null).arg(&mut pw).arg(&n32).arg(&d32).arg(&eps);
                // SAFETY: as above with dx the null pointer and pw the f32 N · D output.
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(pw, dev)
        }
    })
}

/// The backward of [`rms_norm`]: x [N, D], w [D], g [N, D] (contiguous views, one dtype: f32 or
/// bf16) → dx in x's dtype or the weight gradient's rows in f32 (`out`).
pub(crate) fn rms_norm_bwd(x: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout), g: (&CudaStorage, &Layout), nd: (usize, usize), eps: f32, out: BwdOut) -> Result<CudaStorage> {
    match (x.0.dtype(), w.0.dtype(), g.0.dtype()) {
        (DType::F32, DType::F32, DType::F32) => launch_bwd::<f32>(x, w, g, nd, eps, out, "rms_norm_bwd_f32"),
        (DType::BF16, DType::BF16, DType::BF16) => launch_bwd::<bf16>(x, w, g, nd, eps, out, "rms_norm_bwd_bf16"),
        (a, b, c) => candle_core::bail!("rms norm backward: x {a:?}, weight {b:?}, gradient {c:?} (f32 or bf16, all the same)"),
    }
}
