//! Launches of the batch-invariant CUDA kernels (`invariant.cu`), the GPU forward of
//! `crate::nn::invariant`'s ops: every output element computed by one fixed order of
//! floating-point operations, whatever the rows around it (see the .cu file).
//!
//! - `matmul_nt`: x [M, K] · wᵀ (w [N, K]) → [M, N], f32 (FMA) or bf16 (tensor cores; f32
//!   accumulation);
//! - `attention`: q [B, H, Tq, Dh], k, v [B, G, Tk, Dh] (f32), visible [B, Tq, Tk] → [B, H, Tq, Dh].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

use super::Kernel;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/invariant_kernels.ptx"));
const MODULE: &str = "lockstep_invariant";

fn func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

fn contiguous<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((o1, o2)) => Ok(s.as_cuda_slice::<T>()?.slice(o1..o2)),
        None => candle_core::bail!("invariant kernel: {what} must be contiguous"),
    }
}

fn u32_dim(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("invariant kernel: {what} = {n} exceeds u32")))
}

/// The big-tile kernel (64 x 64 outputs a block: `threads` 256 for the f32 FMA kernel, 128 for
/// the bf16 tensor-core one) unless it would fill fewer than two waves of an H100/H200's 132 SMs
/// (decode-size M; f32 also M ≤ 64), then `{name}_skinny` (f32: 8 x 16 a block of 128 threads; bf16: 16 x 16 a
/// warp). Both give every element the same operations in the same order (the .cu file), so the
/// choice, which depends on M, never changes a row's bits.
fn launch_matmul<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    w: &CudaView<T>,
    (m, n, k): (usize, usize, usize),
    name: &str,
    threads: u32,
) -> Result<CudaSlice<T>> {
    let mut y = unsafe { dev.alloc::<T>((m * n).max(1))? };
    if m * n == 0 {
        return Ok(y);
    }
    let (m32, n32, k32) = (u32_dim(m, "M")?, u32_dim(n, "N")?, u32_dim(k, "K")?);
    let bf16 = threads == 128;
    // measured on the H100 (bench-invariant): the f32 skinny kernel wins up to M 64 only
    let skinny = m.div_ceil(64) * n.div_ceil(64) < 2 * 132 && (bf16 || m <= 64);
    let (kernel, (tm, tn), block) = if skinny {
        (format!("{name}_skinny"), if bf16 { (16, 16) } else { (8, 16) }, if bf16 { 32 } else { 128 })
    } else {
        (name.to_string(), (64, 64), threads)
    };
    let gy = m.div_ceil(tm);
    if gy > 65535 {
        candle_core::bail!("invariant matmul: {m} rows exceed one launch (at most {} rows)", 65535 * tm);
    }
    let f = func(dev, &kernel)?;
    let mut b = f.builder();
    b.arg(x).arg(w).arg(&mut y).arg(&m32).arg(&n32).arg(&k32);
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(tn) as u32, gy as u32, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
    unsafe { b.launch(cfg) }.w()?;
    Ok(y)
}

/// x [M, K] · wᵀ (w [N, K]) → [M, N] in x's dtype (f32 or bf16; accumulation in f32).
pub fn matmul_nt(sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout) -> Result<(CudaStorage, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("invariant matmul: inner dims {k} vs {k2}");
    }
    if sx.dtype() != sw.dtype() {
        candle_core::bail!("invariant matmul: x {:?} and w {:?} must share a dtype", sx.dtype(), sw.dtype());
    }
    let dev = sx.device().clone();
    let out = match sx.dtype() {
        DType::F32 => {
            let y = launch_matmul::<f32>(&dev, &contiguous(sx, lx, "x")?, &contiguous(sw, lw, "w")?, (m, n, k), "inv_matmul_nt_f32", 256)?;
            CudaStorage::wrap_cuda_slice(y, dev)
        }
        DType::BF16 => {
            let y = launch_matmul::<bf16>(&dev, &contiguous(sx, lx, "x")?, &contiguous(sw, lw, "w")?, (m, n, k), "inv_matmul_nt_bf16", 128)?;
            CudaStorage::wrap_cuda_slice(y, dev)
        }
        other => candle_core::bail!("invariant matmul: dtype {other:?} not supported on CUDA (f32, bf16)"),
    };
    Ok((out, Shape::from((m, n))))
}

/// Softmax attention with a visibility mask, batch-invariant (f32).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    sq: &CudaStorage,
    lq: &Layout,
    sk: &CudaStorage,
    lk: &Layout,
    sv: &CudaStorage,
    lv: &Layout,
    visible: &[u8],
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (b, h, tq, dh) = lq.shape().dims4()?;
    let (b2, g, tk, dh2) = lk.shape().dims4()?;
    if lv.shape().dims() != lk.shape().dims() || b2 != b || dh2 != dh || g == 0 || h % g != 0 {
        candle_core::bail!("invariant attention: q {:?}, k {:?}, v {:?} do not fit", lq.dims(), lk.dims(), lv.dims());
    }
    if visible.len() != b * tq * tk {
        candle_core::bail!("invariant attention: mask of {} entries for [{b}, {tq}, {tk}]", visible.len());
    }
    // scores of one row live in shared memory (48 KiB without opting in)
    if (tk + 32) * 4 > 48 * 1024 {
        candle_core::bail!("invariant attention: {tk} keys exceed one block's shared memory (at most {})", 48 * 256 - 32);
    }
    let dev = sq.device().clone();
    let (q, k, v) = (contiguous::<f32>(sq, lq, "q")?, contiguous::<f32>(sk, lk, "k")?, contiguous::<f32>(sv, lv, "v")?);
    let rows = b * h * tq;
    let mut out = unsafe { dev.alloc::<f32>((rows * dh).max(1))? };
    if rows > 0 && dh > 0 {
        let vis = dev.clone_htod(visible)?;
        let f = func(&dev, "inv_attention_f32")?;
        let (h32, g32, tq32, tk32, dh32) = (u32_dim(h, "H")?, u32_dim(g, "G")?, u32_dim(tq, "Tq")?, u32_dim(tk, "Tk")?, u32_dim(dh, "Dh")?);
        let mut bld = f.builder();
        bld.arg(&q).arg(&k).arg(&v).arg(&vis).arg(&mut out).arg(&h32).arg(&g32).arg(&tq32).arg(&tk32).arg(&dh32).arg(&scale);
        let cfg = LaunchConfig { grid_dim: (u32_dim(rows, "rows")?, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: ((tk + 32) * 4) as u32 };
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, h, tq, dh))))
}
