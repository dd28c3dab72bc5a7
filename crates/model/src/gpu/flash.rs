//! Launch of `flash.cu`: the tensor-core bf16 variable-length attention (the bf16 CUDA side of
//! `crate::nn::varlen`; f32 stays on `paged.cu`'s kernel). Which kernel runs is decided by the
//! dtype and head dim alone, so the engine's decode step and the trainer's packed forward take
//! the same one. The backward (`flash_bwd_kv_*`, `flash_bwd_q_*`) serves the trainer: it takes
//! the log-sum-exp the forward kept and gives f32 gradients (not batch-invariant; it is never
//! compared bit for bit, only against the f32 reference within tolerance).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

use super::flash_func as func;
use super::ops::contiguous;
use super::paged::{device_layout, u32_of, HostLayout};

/// Rows (query, head) per block (`FROWS` in flash.cu) and threads per block (`FT`).
pub(crate) const ROWS: usize = 64;
/// Keys per block of the backward's dK / dV kernel: `KC` in flash.cu (64, the forward's key
/// chunk too); `KeyLayout::key_chunks` cuts the chunks table by it, so the two must agree.
pub(crate) const KEYS: usize = 64;
const THREADS: u32 = 128;

/// The forward's dynamic shared memory: two stages of a key chunk's keys and values, KEYS rows of
/// Dh + 8 bf16 each (`FLASH_STAGE` in flash.cu): 69,632 bytes at Dh = 128.
fn fwd_smem(dh: usize) -> u32 {
    (2 * 2 * KEYS * (dh + 8) * 2) as u32
}

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

/// The tiles of `cell` when made for `r` heads per kv head, else made now (and kept when the
/// cell is empty), handed to `f`.
fn with_tiles<T>(dev: &CudaDevice, cell: &std::sync::OnceLock<Tiles>, r: usize, host_tiles: impl FnOnce(usize) -> Result<Vec<u32>>, f: impl FnOnce(&Tiles) -> Result<T>) -> Result<T> {
    match cell.get() {
        Some(t) if t.r == r => f(t),
        cached => {
            let host = host_tiles(r)?;
            let t = Tiles { r, n: host.len() / 4, tiles: dev.clone_htod(&host)? };
            if cached.is_none() {
                f(cell.get_or_init(|| t))
            } else {
                f(&t)
            }
        }
    }
}

/// The kernel `<stem>_<Dh>` (`serves` admitted Dh = 16, 32, 64, 128 only).
fn kernel_name(stem: &str, dh: usize) -> &'static str {
    match (stem, dh) {
        ("fwd", 16) => "flash_fwd_bf16_16",
        ("fwd", 32) => "flash_fwd_bf16_32",
        ("fwd", 64) => "flash_fwd_bf16_64",
        ("fwd", _) => "flash_fwd_bf16_128",
        ("kv", 16) => "flash_bwd_kv_bf16_16",
        ("kv", 32) => "flash_bwd_kv_bf16_32",
        ("kv", 64) => "flash_bwd_kv_bf16_64",
        ("kv", _) => "flash_bwd_kv_bf16_128",
        (_, 16) => "flash_bwd_q_bf16_16",
        (_, 32) => "flash_bwd_q_bf16_32",
        (_, 64) => "flash_bwd_q_bf16_64",
        _ => "flash_bwd_q_bf16_128",
    }
}

fn check_inputs(dtypes: [DType; 3], dh: usize, starts: [(&str, &Layout); 3]) -> Result<()> {
    if !serves(dtypes[0], dh) || dtypes[1] != DType::BF16 || dtypes[2] != DType::BF16 {
        candle_core::bail!("flash attention: bf16 q, k, v with head dim 16, 32, 64 or 128 (got {:?}, {dh})", dtypes[0]);
    }
    // 16-byte loads of k, v rows and 4-byte loads of q: every row starts at a multiple of 8
    for (what, l) in starts {
        if l.start_offset() % 8 != 0 {
            candle_core::bail!("flash attention: {what} starts at element {}, not a multiple of 8", l.start_offset());
        }
    }
    Ok(())
}

/// q [N, H, Dh] over the pool k, v [R, G, Dh] under `layout` → [N, H, Dh] bf16 (see flash.cu),
/// and with `keep_lse` each row's log-sum-exp [N · H] f32 for [`backward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    (sq, lq, sk, lk, sv, lv): (&CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout),
    layout: &HostLayout,
    host_tiles: impl FnOnce(usize) -> Result<Vec<u32>>,
    cell: &std::sync::OnceLock<Tiles>,
    (n, h, g, dh): (usize, usize, usize, usize),
    scale: f32,
    keep_lse: bool,
) -> Result<(CudaStorage, Shape, Option<CudaSlice<f32>>)> {
    check_inputs([sq.dtype(), sk.dtype(), sv.dtype()], dh, [("q", lq), ("k", lk), ("v", lv)])?;
    let dev: CudaDevice = sq.device().clone();
    let (q, k, v) = (contiguous::<bf16>(sq, lq, "flash q")?, contiguous::<bf16>(sk, lk, "flash k")?, contiguous::<bf16>(sv, lv, "flash v")?);
    // SAFETY: uninitialised, but the launch writes out[n, h, 0..Dh] (and lse[n, h]) for every
    // (n, h): the tiles cover every row (n, h) of every query group once, and `KeyLayout::new`
    // checked that every query sees a key; n · h · dh = 0 returns never-read buffers.
    let mut out = unsafe { dev.alloc::<bf16>((n * h * dh).max(1))? };
    let mut lse = if keep_lse { Some(unsafe { dev.alloc::<f32>((n * h).max(1))? }) } else { None };
    if n * h * dh == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((n, h, dh)), lse));
    }
    let tabs = device_layout(&dev, layout)?;
    let f = func(&dev, kernel_name("fwd", dh))?;
    let (h32, g32, bs32) = (u32_of(h, "H")?, u32_of(g, "G")?, u32_of(layout.block_size, "block size")?);
    let null = 0u64;
    with_tiles(&dev, cell, h / g, host_tiles, |tiles| {
        let mut b = f.builder();
        b.arg(&q).arg(&k).arg(&v).arg(&tabs.table).arg(&tabs.start).arg(&tabs.keys).arg(&tiles.tiles).arg(&mut out);
        match lse.as_mut() {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&h32).arg(&g32).arg(&bs32).arg(&scale);
        let smem = fwd_smem(dh);
        f.allow_smem(smem)?;
        let cfg = LaunchConfig { grid_dim: (u32_of(tiles.n, "tiles")?, g32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem };
        // SAFETY: the arguments are those of `flash_fwd_bf16_<Dh>(q, k, v, table, start, keys,
        // tiles, out, lse, H, G, bs, scale)` in order, all bf16 / u32 / f32 as declared (lse a
        // null pointer, which the kernel tests, when not kept). q is the contiguous [N, H, Dh],
        // k and v the contiguous [R, G, Dh] pool (the op checked the shapes, H % G = 0), each
        // starting 16-byte aligned (checked above), out holds N · H · Dh and lse N · H. The
        // tables are the layout's, checked by `KeyLayout::new` (every key a query sees lies in
        // the pool); each tile names a query range of one group and a row start inside it, and
        // its key bound is the largest key count of those queries. Grid (tiles, G), THREADS
        // threads (the kernel's launch bound), `fwd_smem(dh)` bytes of dynamic shared memory (its
        // two stages, as flash.cu's FLASH_STAGE lays them out; allowed above 48 KiB just above)
        // beside 512 bytes of static.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, h, dh)), lse))
}

/// The gradients of [`attention`] at q, k, v given the output's gradient `d_o` [N, H, Dh] bf16,
/// `delta` = rowsum(d_o ∘ out) [N, H, 1] f32 and the forward's `lse`: one f32 buffer holding
/// dq [N, H, Dh], then dk and dv [R, G, Dh] each, shape [N·H·Dh + 2·R·G·Dh]. `chunks` is the
/// layout's blocks of 64 keys (`KeyLayout::key_chunks`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    (sq, lq, sk, lk, sv, lv): (&CudaStorage, &Layout, &CudaStorage, &Layout, &CudaStorage, &Layout),
    (d_o, delta, lse): (&Tensor, &Tensor, &CudaSlice<f32>),
    layout: &HostLayout,
    host_tiles: impl FnOnce(usize) -> Result<Vec<u32>>,
    cell: &std::sync::OnceLock<Tiles>,
    chunks: &[u32],
    (n, h, g, dh, rows): (usize, usize, usize, usize, usize),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    check_inputs([sq.dtype(), sk.dtype(), sv.dtype()], dh, [("q", lq), ("k", lk), ("v", lv)])?;
    if d_o.dtype() != DType::BF16 || d_o.dims() != [n, h, dh] || delta.dtype() != DType::F32 || delta.elem_count() != n * h || lse.len() < n * h {
        candle_core::bail!("flash backward: d_o {:?} {:?}, delta {:?} {:?}, lse {} for [{n}, {h}, {dh}]", d_o.dtype(), d_o.dims(), delta.dtype(), delta.dims(), lse.len());
    }
    let dev: CudaDevice = sq.device().clone();
    let (q, k, v) = (contiguous::<bf16>(sq, lq, "flash q")?, contiguous::<bf16>(sk, lk, "flash k")?, contiguous::<bf16>(sv, lv, "flash v")?);
    let ((so, lo), (sd, ld)) = (d_o.storage_and_layout(), delta.storage_and_layout());
    let (Storage::Cuda(so), Storage::Cuda(sd)) = (&*so, &*sd) else { candle_core::bail!("flash backward: d_o and delta must live on the CUDA device") };
    // d_o rows are read 16 bytes at a time, like q
    if lo.start_offset() % 8 != 0 {
        candle_core::bail!("flash backward: d_o starts at element {}, not a multiple of 8", lo.start_offset());
    }
    let (dout, dlt) = (contiguous::<bf16>(so, lo, "flash d_o")?, contiguous::<f32>(sd, ld, "flash delta")?);
    let (nq, nk) = (n * h * dh, rows * g * dh);
    let total = nq + 2 * nk;
    let mut grads = dev.alloc_zeros::<f32>(total.max(1))?;
    if nq == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(grads, dev), Shape::from(total)));
    }
    let tabs = device_layout(&dev, layout)?;
    let (h32, g32, bs32) = (u32_of(h, "H")?, u32_of(g, "G")?, u32_of(layout.block_size, "block size")?);
    let chunk_tab = dev.clone_htod(chunks)?;
    {
        let (mut dq, mut rest) = grads.split_at_mut(nq);
        let (mut dk, mut dv) = rest.split_at_mut(nk);
        let fkv = func(&dev, kernel_name("kv", dh))?;
        let mut b = fkv.builder();
        b.arg(&q).arg(&k).arg(&v).arg(&dout).arg(lse).arg(&dlt).arg(&tabs.table).arg(&tabs.start).arg(&tabs.keys).arg(&chunk_tab).arg(&mut dk).arg(&mut dv);
        b.arg(&h32).arg(&g32).arg(&bs32).arg(&scale);
        let cfg = LaunchConfig { grid_dim: (u32_of(chunks.len() / 4, "key chunks")?, g32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `flash_bwd_kv_bf16_<Dh>(q, k, v, d_o, lse, delta,
        // table, start, keys, chunks, dk, dv, H, G, bs, scale)` in order, of the declared types.
        // q, d_o are contiguous [N, H, Dh], lse and delta hold N · H values (checked above), k,
        // v the contiguous [R, G, Dh] pool and dk, dv R · G · Dh each (disjoint parts of one
        // zeroed buffer). Each chunk names a query range of one group, a key start below the
        // group's key bound and that bound (`KeyLayout::key_chunks`); the tables are the
        // layout's, checked by `KeyLayout::new`. Grid (chunks, G), THREADS threads (the launch
        // bound); static shared memory at most 44 KB.
        unsafe { b.launch(cfg) }.w()?;
        let fq = func(&dev, kernel_name("q", dh))?;
        with_tiles(&dev, cell, h / g, host_tiles, |tiles| {
            let mut b = fq.builder();
            b.arg(&q).arg(&k).arg(&v).arg(&dout).arg(lse).arg(&dlt).arg(&tabs.table).arg(&tabs.start).arg(&tabs.keys).arg(&tiles.tiles).arg(&mut dq);
            b.arg(&h32).arg(&g32).arg(&bs32).arg(&scale);
            let cfg = LaunchConfig { grid_dim: (u32_of(tiles.n, "tiles")?, g32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments are those of `flash_bwd_q_bf16_<Dh>(q, k, v, d_o, lse, delta,
            // table, start, keys, tiles, dq, H, G, bs, scale)` in order; the tiles are the
            // forward's (each row (n, h) in exactly one tile, so dq's N · H · Dh values are each
            // written once); the rest as for the kv kernel above. Static shared memory ≤ 35 KB.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })?;
    }
    Ok((CudaStorage::wrap_cuda_slice(grads, dev), Shape::from(total)))
}

/// δ = rowsum(d_o ∘ out) [N, H, 1] f32 of the output's gradient and the output (both
/// contiguous [N, H, Dh] bf16), one launch (`flash_delta_bf16`; the order of its sum differs
/// from candle's reduction, which the backward does not depend on).
pub(crate) fn delta(d_o: (&CudaStorage, &Layout), out: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let (n, h, dh) = d_o.1.shape().dims3()?;
    if out.1.shape().dims() != [n, h, dh] {
        candle_core::bail!("flash delta: d_o [{n}, {h}, {dh}], out {:?}", out.1.shape().dims());
    }
    let dev: CudaDevice = d_o.0.device().clone();
    let (a, b) = (contiguous::<bf16>(d_o.0, d_o.1, "flash delta d_o")?, contiguous::<bf16>(out.0, out.1, "flash delta out")?);
    let rows = n * h;
    // SAFETY: uninitialised, but the launch writes delta[r] for every row r < N · H (a warp
    // each); no rows returns a never-read buffer.
    let mut delta = unsafe { dev.alloc::<f32>(rows.max(1))? };
    if rows > 0 {
        let (rows32, dh32) = (u32_of(rows, "N · H")?, u32_of(dh, "Dh")?);
        let blocks = u32_of((rows * 32).div_ceil(256), "delta blocks")?;
        let f = func(&dev, "flash_delta_bf16")?;
        let mut b_ = f.builder();
        b_.arg(&a).arg(&b).arg(&mut delta).arg(&rows32).arg(&dh32);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `flash_delta_bf16(dout, o, delta, rows, dh)` in
        // order: dout and o the contiguous [N, H, Dh] bf16 views (rows · Dh elements each, the
        // shapes checked above), delta rows f32; a warp per row, warps past the rows return
        // (whole warps: 256-thread blocks), and a lane reads only its row's channels < Dh.
        unsafe { b_.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(delta, dev), Shape::from((n, h, 1))))
}
