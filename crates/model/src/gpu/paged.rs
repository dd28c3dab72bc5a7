//! Launches of `paged.cu`: the key / value writes into the paged pool and the variable-length
//! attention over key tables (the CUDA side of `crate::nn::varlen` and `crate::nn::kv_write`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

use super::ops::contiguous;
use super::paged_func as func;

/// Largest head dim the kernel holds (`MAX_DH` in paged.cu).
const MAX_DH: usize = 512;
const THREADS: u32 = 128;

/// A key layout's tables on the device, uploaded once per layout (a step), used by every layer.
#[derive(Debug)]
pub(crate) struct DeviceLayout {
    pub(super) table: CudaSlice<u32>,
    pub(super) start: CudaSlice<u32>,
    pub(super) keys: CudaSlice<u32>,
}

/// A key layout's host tables (block table, per-query start and key count) and block size, with
/// the cell its device copy is kept in (the variable-length attention's key layout owns both).
pub(crate) struct HostLayout<'a> {
    pub table: &'a [u32],
    pub start: &'a [u32],
    pub keys: &'a [u32],
    pub block_size: usize,
    pub device: &'a std::sync::OnceLock<DeviceLayout>,
}

pub(super) fn device_layout<'a>(dev: &CudaDevice, layout: &HostLayout<'a>) -> Result<&'a DeviceLayout> {
    if let Some(d) = layout.device.get() {
        return Ok(d);
    }
    let (t, s, k) = (layout.table, layout.start, layout.keys);
    // an empty table still needs a valid allocation
    let table = if t.is_empty() { dev.clone_htod(&[0u32])? } else { dev.clone_htod(t)? };
    let d = DeviceLayout { table, start: dev.clone_htod(s)?, keys: dev.clone_htod(k)? };
    Ok(layout.device.get_or_init(|| d))
}

pub(super) fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("paged kernel: {what} = {n} exceeds u32")))
}

fn launch_varlen<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    (sq, lq, sk, lk, sv, lv): (&CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout),
    layout: &HostLayout,
    (n, h, g, dh): (usize, usize, usize, usize),
    scale: f32,
    name: &str,
) -> Result<CudaSlice<T>> {
    let (q, k, v) = (contiguous::<T>(sq, lq, "varlen q")?, contiguous::<T>(sk, lk, "varlen k")?, contiguous::<T>(sv, lv, "varlen v")?);
    // SAFETY: uninitialised, but the launch writes out[n, h, 0..Dh] for every (n, h) (one block
    // each, every query sees at least one key: `KeyLayout::new` checks it); n · h · dh = 0 returns
    // a never-read buffer.
    let mut out = unsafe { dev.alloc::<T>((n * h * dh).max(1))? };
    if n * h * dh == 0 {
        return Ok(out);
    }
    let tabs = device_layout(dev, layout)?;
    let f = func(dev, name)?;
    let (h32, g32, dh32, bs32) = (u32_of(h, "H")?, u32_of(g, "G")?, u32_of(dh, "Dh")?, u32_of(layout.block_size, "block size")?);
    let mut b = f.builder();
    b.arg(&q).arg(&k).arg(&v).arg(&tabs.table).arg(&tabs.start).arg(&tabs.keys).arg(&mut out).arg(&h32).arg(&g32).arg(&dh32).arg(&bs32).arg(&scale);
    let cfg = LaunchConfig { grid_dim: (u32_of(n * h, "queries x heads")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are those of `varlen_attention_*(q, k, v, table, start, keys, out, H,
    // G, Dh, bs, scale)` in order, T its element type. q is the contiguous [N, H, Dh], k and v the
    // contiguous [R, G, Dh] pool (the op checked the shapes, G > 0, H % G = 0, Dh <= MAX_DH), out
    // holds N · H · Dh. The tables are the layout's, which `KeyLayout::new` checked: every
    // query's keys[n] >= 1 entries of table from start[n] exist and every block's rows lie
    // inside the pool's R rows. One block per (n, h) = blockIdx.x, THREADS threads (the kernel's
    // launch bound; its static shared memory is fixed).
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// q [N, H, Dh] over the pool k, v [R, G, Dh] under `layout` → [N, H, Dh] (f32 or bf16).
#[allow(clippy::too_many_arguments)]
pub(crate) fn varlen_attention(
    sq: &CudaStorage,
    lq: &Layout,
    sk: &CudaStorage,
    lk: &Layout,
    sv: &CudaStorage,
    lv: &Layout,
    layout: &HostLayout,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (n, h, _, dh) = dims;
    if dh > MAX_DH {
        candle_core::bail!("varlen attention: head dim {dh} exceeds {MAX_DH}");
    }
    if sq.dtype() != sk.dtype() || sq.dtype() != sv.dtype() {
        candle_core::bail!("varlen attention: q, k, v must share a dtype");
    }
    let dev = sq.device().clone();
    let args = (sq, lq, sk, lk, sv, lv);
    let out = match sq.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(launch_varlen::<f32>(&dev, args, layout, dims, scale, "varlen_attention_f32")?, dev),
        DType::BF16 => CudaStorage::wrap_cuda_slice(launch_varlen::<bf16>(&dev, args, layout, dims, scale, "varlen_attention_bf16")?, dev),
        other => candle_core::bail!("varlen attention: dtype {other:?} not supported on CUDA (f32, bf16)"),
    };
    Ok((out, Shape::from((n, h, dh))))
}

fn launch_write<T: CudaDType + DeviceRepr>(pool: &mut CudaStorage, lp: &Layout, src: &CudaStorage, ls: &Layout, slot: &CudaStorage, lslot: &Layout, name: &str) -> Result<()> {
    let (rows, width) = (ls.shape().dims()[0], ls.shape().elem_count() / ls.shape().dims()[0].max(1));
    let dev = pool.device().clone();
    let s = contiguous::<T>(src, ls, "kv write src")?;
    let sl = contiguous::<u32>(slot, lslot, "kv write slots")?;
    if lp.start_offset() != 0 || !lp.is_contiguous() {
        candle_core::bail!("kv write: the pool must be contiguous from offset 0");
    }
    let p = pool.as_cuda_slice_mut::<T>()?;
    if rows * width == 0 {
        return Ok(());
    }
    let f = func(&dev, name)?;
    let (r32, w32) = (u32_of(rows, "rows")?, u32_of(width, "row width")?);
    let mut b = f.builder();
    b.arg(p).arg(&s).arg(&sl).arg(&r32).arg(&w32);
    let blocks = (rows * width).div_ceil(256).min(65535 * 8) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are those of `kv_write_*(pool, src, slot, rows, width)` in order, T
    // its element type. src is the contiguous [rows, width] block of new rows, slot holds `rows`
    // u32 slots, each checked by `KvPool::write` to be below the pool's row count, and the pool
    // is contiguous [R, width] from offset 0, so pool[slot · width + e] is in bounds. The kernel
    // is a grid-stride loop: any grid size covers all rows · width elements.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// pool[slot[t]] = src[t] for every row t (pool [R, ..], src [T, ..] of the pool's row shape).
pub(crate) fn kv_write(pool: &mut CudaStorage, lp: &Layout, src: &CudaStorage, ls: &Layout, slot: &CudaStorage, lslot: &Layout) -> Result<()> {
    match pool.dtype() {
        DType::F32 => launch_write::<f32>(pool, lp, src, ls, slot, lslot, "kv_write_f32"),
        DType::BF16 => launch_write::<bf16>(pool, lp, src, ls, slot, lslot, "kv_write_bf16"),
        other => candle_core::bail!("kv write: dtype {other:?} not supported on CUDA (f32, bf16)"),
    }
}
