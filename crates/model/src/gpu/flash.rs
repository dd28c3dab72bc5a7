//! Launch of `flash.cu`: the tensor-core bf16 variable-length attention (the bf16 CUDA side of
//! `crate::nn::varlen`; f32 stays on `paged.cu`'s kernel). Which kernel runs is decided by the
//! dtype and head dim alone, so the engine's decode step and the trainer's packed forward take
//! the same one.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

use super::flash_func as func;
use super::ops::contiguous;
use super::paged::{device_layout, u32_of, HostLayout};

/// Rows (query, head) per block (`FROWS` in flash.cu) and threads per block (`FT`).
pub(crate) const ROWS: usize = 64;
const THREADS: u32 = 128;

/// Whether the tensor-core kernel serves this dtype and head dim.
pub(crate) fn serves(dtype: DType, dh: usize) -> bool {
    dtype == DType::BF16 && matches!(dh, 16 | 32 | 64 | 128)
}

/// A layout's block tiles for `r` query heads per kv head, on the device: per block
/// (first query of its sequence, one past the last, first row, most keys seen).
#[derive(Debug)]
pub(crate) struct Tiles {
    r: usize,
    n: usize,
    tiles: CudaSlice<u32>,
}

/// q [N, H, Dh] over the pool k, v [R, G, Dh] under `layout` → [N, H, Dh] bf16 (see flash.cu).
pub(crate) fn attention(
    (sq, lq, sk, lk, sv, lv): (&CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout),
    layout: &HostLayout,
    host_tiles: impl FnOnce(usize) -> Result<Vec<u32>>,
    cell: &std::sync::OnceLock<Tiles>,
    (n, h, g, dh): (usize, usize, usize, usize),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    if !serves(sq.dtype(), dh) || sk.dtype() != DType::BF16 || sv.dtype() != DType::BF16 {
        candle_core::bail!("flash attention: bf16 q, k, v with head dim 16, 32, 64 or 128 (got {:?}, {dh})", sq.dtype());
    }
    let dev: CudaDevice = sq.device().clone();
    // 16-byte loads of k, v rows and 4-byte loads of q: every row starts at a multiple of 8
    for (what, l) in [("q", lq), ("k", lk), ("v", lv)] {
        if l.start_offset() % 8 != 0 {
            candle_core::bail!("flash attention: {what} starts at element {}, not a multiple of 8", l.start_offset());
        }
    }
    let (q, k, v) = (contiguous::<bf16>(sq, lq, "flash q")?, contiguous::<bf16>(sk, lk, "flash k")?, contiguous::<bf16>(sv, lv, "flash v")?);
    // SAFETY: uninitialised, but the launch writes out[n, h, 0..Dh] for every (n, h): the tiles
    // cover every row (n, h) of every query group once, and `KeyLayout::new` checked that every
    // query sees a key; n · h · dh = 0 returns a never-read buffer.
    let mut out = unsafe { dev.alloc::<bf16>((n * h * dh).max(1))? };
    if n * h * dh == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, h, dh))));
    }
    let r = h / g;
    let fresh;
    let tiles = match cell.get() {
        Some(t) if t.r == r => t,
        cached => {
            let host = host_tiles(r)?;
            let t = Tiles { r, n: host.len() / 4, tiles: dev.clone_htod(&host)? };
            if cached.is_none() {
                cell.get_or_init(|| t)
            } else {
                fresh = t;
                &fresh
            }
        }
    };
    let tabs = device_layout(&dev, layout)?;
    let name = match dh {
        16 => "flash_fwd_bf16_16",
        32 => "flash_fwd_bf16_32",
        64 => "flash_fwd_bf16_64",
        _ => "flash_fwd_bf16_128", // `serves` admitted 16, 32, 64, 128 only
    };
    let f = func(&dev, name)?;
    let (h32, g32, bs32) = (u32_of(h, "H")?, u32_of(g, "G")?, u32_of(layout.block_size, "block size")?);
    let mut b = f.builder();
    b.arg(&q).arg(&k).arg(&v).arg(&tabs.table).arg(&tabs.start).arg(&tabs.keys).arg(&tiles.tiles).arg(&mut out).arg(&h32).arg(&g32).arg(&bs32).arg(&scale);
    let cfg = LaunchConfig { grid_dim: (u32_of(tiles.n, "tiles")?, g32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are those of `flash_fwd_bf16_<Dh>(q, k, v, table, start, keys,
    // tiles, out, H, G, bs, scale)` in order, all bf16 / u32 as declared. q is the contiguous
    // [N, H, Dh], k and v the contiguous [R, G, Dh] pool (the op checked the shapes, H % G = 0),
    // each starting 16-byte aligned (checked above), out holds N · H · Dh. The tables are the
    // layout's, checked by `KeyLayout::new` (every key a query sees lies in the pool); each tile
    // names a query range of one group and a row start inside it, and its key bound is the
    // largest key count of those queries. Grid (tiles, G), THREADS threads (the kernel's launch
    // bound); its static shared memory is at most 35 KB.
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, h, dh))))
}
