//! Launches of the batch-invariant CUDA kernels (`invariant.cu`), the GPU forward of
//! `crate::nn::invariant`'s ops: every output element computed by one fixed order of
//! floating-point operations, whatever the rows around it (see the .cu file).
//!
//! - `matmul_nt`: x [M, K] · wᵀ (w [N, K]) → [M, N], f32 (FMA) or bf16 (tensor cores; f32
//!   accumulation). The attention is `paged.rs`'s.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

use super::invariant_func as func;
use super::plan::Plan;
use super::ops::contiguous;

fn u32_dim(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("invariant kernel: {what} = {n} exceeds u32")))
}

/// The matmul kernels of one dtype: the big-tile one (64 x 64 outputs a block), the skinny
/// one for decode-size M, and for bf16 the thin ones and the pipelined tensor-core one. All give
/// every element the same operations in the same order (the .cu file), so the choice, which
/// depends on M (and on K and the alignment), never changes a row's bits.
struct MatmulKernels {
    /// (name, threads) of the 64 x 64 kernel
    big: (&'static str, u32),
    /// (name, threads, rows, cols of its tile)
    skinny: (&'static str, u32, usize, usize),
    /// the largest M the skinny kernel is used for (measured on the H100 by bench-invariant)
    skinny_max_m: usize,
    /// the thin kernels (1, 2, 3, 4 m-tiles of 16 rows a warp; 32 columns a block of 4 warps)
    /// for M <= THIN_MAX_M when K % 16 = 0 and the rows are 4-byte aligned: many warps
    /// streaming the weights. (Session 14's ncu profile of a decode step at 17–48 requests: the
    /// skinny kernel took 106–212 µs for the 2–17 MB q / k / v / o / router weights, 10–60 GB/s,
    /// 42% of the step's device time.)
    thin: Option<[&'static str; 4]>,
    /// the pipelined tensor-core kernel (TC_TILE outputs a block, TC_THREADS threads, TC_SMEM
    /// bytes of dynamic shared memory), in place of the big one when K % 8 = 0 and both start
    /// offsets are multiples of 8 elements (its 16-byte cp.async loads)
    tc: Option<&'static str>,
}

const F32_KERNELS: MatmulKernels =
    MatmulKernels { big: ("inv_matmul_nt_f32", 256), skinny: ("inv_matmul_nt_f32_skinny", 128, 8, 16), skinny_max_m: 64, thin: None, tc: None };
const BF16_KERNELS: MatmulKernels = MatmulKernels {
    big: ("inv_matmul_nt_bf16", 128),
    skinny: ("inv_matmul_nt_bf16_skinny", 32, 16, 16),
    skinny_max_m: usize::MAX,
    thin: Some(["inv_matmul_nt_bf16_thin1", "inv_matmul_nt_bf16_thin2", "inv_matmul_nt_bf16_thin3", "inv_matmul_nt_bf16_thin4"]),
    tc: Some("inv_matmul_nt_bf16_tc"),
};
/// Rows of the thin kernels' m-tile, their columns per block and threads.
const THIN_ROWS: usize = 16;
/// The most rows the dense thin kernels take (one block row of up to 4 m-tiles: the weights
/// streamed once; past it the tensor-core kernel, whose 128-row tiles read them once too).
const THIN_MAX_M: usize = 64;
/// The most rows per expert (on average) the grouped register thin kernel takes (rows not 16-byte
/// aligned); with more, the 16 x 16 one is faster (bench-invariant, 128 experts x 16 rows: 0.485
/// against 0.685 ms).
const THIN_GROUPED_MAX_ROWS: usize = 8;
/// The dense `thin_l` kernel's grid limit, in blocks of 16 rows x 32 columns at K = 2048 (about
/// one wave of an H200's 132 SMs): see [`thin_l_takes`].
const THIN_L_WAVE: usize = 512;
const THIN_COLS: usize = 32;
const THIN_THREADS: u32 = 128;
/// The tensor-core kernels' (`inv_matmul_nt_bf16_tc`, `inv_grouped_nt_bf16_tc`) output tile
/// (rows, cols: TC_BM x TC_BN), threads (TC_THREADS: 4 warps of 64 x 64) and dynamic shared
/// memory (TC_SMEM: 4 stages of 128 + 128 rows x 32 bf16) in invariant.cu.
const TC_TILE: (usize, usize) = (128, 128);
const TC_THREADS: u32 = 128;
const TC_SMEM: u32 = 4 * (128 + 128) * 32 * 2;

/// Whether the tensor-core kernels may run on x and w with these start offsets (elements) and
/// inner size: every row then starts on a 16-byte boundary (the allocations are 256-byte aligned)
/// and a 16-byte chunk of 8 elements is all in or all out of a row.
fn tc_aligned(x_offset: usize, w_offset: usize, k: usize) -> bool {
    k % 8 == 0 && x_offset % 8 == 0 && w_offset % 8 == 0
}

/// Whether the dense `thin_l` kernel (x and w through shared memory, a block per 16 rows x 32
/// columns; `col_blocks` = Σ ⌈N_i / 32⌉ over the launch's weights) is the faster one for M rows:
/// up to 8 rows, or up to 256 while its grid is about one wave (col_blocks · ⌈M / 16⌉ · K /
/// 2048 <= THIN_L_WAVE); beyond, the tensor-core kernel's 128 x 128 tiles. kbench on an H200
/// (invariant_mma.cuh): o (N 2048, K 4096) at 64 rows 27.1 us against the tensor cores' 48.5,
/// q + k + v (N 5120) at 64 rows 28.8 against 27.2, the LM head at 1 row 154 against 242 (x
/// alone through shared memory) and at 16 rows 213 against 180.
fn thin_l_takes(m: usize, col_blocks: usize, k: usize) -> bool {
    m <= 8 || (m <= 256 && col_blocks * m.div_ceil(THIN_ROWS) * k <= THIN_L_WAVE * 2048)
}

/// `thin_l` where the family has it, K % 16 = 0, the offsets allow its 16-byte copies
/// (`tc_aligned`) and it is the faster one ([`thin_l_takes`]); else a register thin kernel for
/// M <= THIN_MAX_M where the tensor-core one cannot run (K % 16 = 0, even start offsets; 16 ·
/// ⌈M / 16⌉ rows a block row up to 64); else the tensor-core one where the
/// family has one and K and the offsets allow it (`tc_aligned`); else the skinny kernel when
/// the big one would fill fewer than two waves of an H100/H200's 132 SMs (and M is within the
/// kernel family's `skinny_max_m`), else the big one. `offsets`: x's and w's start offsets in
/// their storage (elements).
fn launch_matmul<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    w: &CudaView<T>,
    (m, n, k): (usize, usize, usize),
    kernels: &MatmulKernels,
    offsets: (usize, usize),
) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised, but the launch below writes every y[m, n]: its grid has a block per
    // tm x tn output tile of the chosen kernel, ceil(N / tn) x ceil(M / tm) of them, and every
    // kernel stores each in-range element of its tile; m · n = 0 returns a never-read buffer.
    let mut y = unsafe { dev.alloc::<T>((m * n).max(1))? };
    if m * n == 0 {
        return Ok(y);
    }
    let (m32, n32, k32) = (u32_dim(m, "M")?, u32_dim(n, "N")?, u32_dim(k, "K")?);
    let skinny = m.div_ceil(64) * n.div_ceil(64) < 2 * 132 && m <= kernels.skinny_max_m;
    let even = offsets.0 % 2 == 0 && offsets.1 % 2 == 0;
    let tc = kernels.tc.filter(|_| tc_aligned(offsets.0, offsets.1, k));
    // (name, threads, tile rows, tile cols, dynamic shared memory bytes)
    let thin_l = kernels.thin.is_some() && tc.is_some() && k % 16 == 0 && thin_l_takes(m, n.div_ceil(THIN_COLS), k);
    let (name, block, tm, tn, smem) = match (kernels.thin, tc) {
        (Some(_), Some(_)) if thin_l => ("inv_matmul_nt_bf16_thin_l", THIN_THREADS, THIN_ROWS, THIN_COLS, 0),
        // where the 16-byte copies cannot run: the register thin kernels up to 64 rows (kbench:
        // they take 33-146 us for q / k / v / o against thin_l's 11-27)
        (Some(thin), None) if m <= THIN_MAX_M && k % 16 == 0 && even => {
            let mt = m.div_ceil(THIN_ROWS).min(thin.len());
            (thin[mt - 1], THIN_THREADS, mt * THIN_ROWS, THIN_COLS, 0)
        }
        (_, Some(tc)) => (tc, TC_THREADS, TC_TILE.0, TC_TILE.1, TC_SMEM),
        _ if skinny => (kernels.skinny.0, kernels.skinny.1, kernels.skinny.2, kernels.skinny.3, 0),
        _ => (kernels.big.0, kernels.big.1, 64, 64, 0),
    };
    let gy = m.div_ceil(tm);
    if gy > 65535 {
        candle_core::bail!("invariant matmul: {m} rows exceed one launch (at most {} rows)", 65535 * tm);
    }
    let f = func(dev, name)?;
    f.allow_smem(smem)?;
    let mut b = f.builder();
    b.arg(x).arg(w).arg(&mut y).arg(&m32).arg(&n32).arg(&k32);
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(tn) as u32, gy as u32, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem };
    // SAFETY: the arguments are those of `inv_matmul_nt_*(x, w, y, M, N, K)` (invariant.cu) in
    // order, `T` the kernel's element type (`matmul_nt` picks the kernels by dtype and checks x
    // and w share it). x is the contiguous [M, K] and w the [N, K] input (K checked equal), y
    // holds M · N, and the kernels bound-check m < M, n < N, k < K on every load and store (the
    // 16-byte loads also check K % 8 and the pointers' alignment; the thin kernels' 4-byte loads
    // are chosen only for K % 16 = 0 and even start offsets, and the shared-memory ones' (thin_l,
    // tensor-core) 16-byte cp.async copies only for K % 8 = 0 and start offsets that are
    // multiples of 8 elements —
    // 16 bytes, the allocations being 256-byte aligned — and a copy out of range reads nothing,
    // src-size 0 from the base pointer, zero-filling its shared-memory chunk). `block` and (tm,
    // tn) are the thread count (its `__launch_bounds__`) and output tile each kernel is written
    // for, `smem` the dynamic shared memory the tensor-core kernel indexes (TC_SMEM: its
    // 4 stages x 256 rows x 64 bytes; the function's limit raised to it above; 0 for the others,
    // which use static shared memory only), and gy is within the grid's 65535 limit (checked
    // above).
    unsafe { b.launch(cfg) }.w()?;
    Ok(y)
}

/// x [M, K] · wᵀ (w [N, K]) → [M, N] in x's dtype (f32 or bf16; accumulation in f32).
pub(crate) fn matmul_nt(sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout) -> Result<(CudaStorage, Shape)> {
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
            let y = launch_matmul::<f32>(&dev, &contiguous(sx, lx, "invariant matmul x")?, &contiguous(sw, lw, "invariant matmul w")?, (m, n, k), &F32_KERNELS, (lx.start_offset(), lw.start_offset()))?;
            CudaStorage::wrap_cuda_slice(y, dev)
        }
        DType::BF16 => {
            let y = launch_matmul::<bf16>(&dev, &contiguous(sx, lx, "invariant matmul x")?, &contiguous(sw, lw, "invariant matmul w")?, (m, n, k), &BF16_KERNELS, (lx.start_offset(), lw.start_offset()))?;
            CudaStorage::wrap_cuda_slice(y, dev)
        }
        other => candle_core::bail!("invariant matmul: dtype {other:?} not supported on CUDA (f32, bf16)"),
    };
    Ok((out, Shape::from((m, n))))
}

/// Whether [`matmul_nt3`] takes x [_, k] with these start offsets (x's, then the weights') and
/// weight rows `n`: bf16 with even N_i and the shared-memory kernels' 16-byte alignment
/// (`tc_aligned`).
pub(crate) fn nt3_fits(k: usize, x_offset: usize, w_offsets: [usize; 3], n: [usize; 3]) -> bool {
    w_offsets.iter().all(|&o| tc_aligned(x_offset, o, k)) && n.iter().all(|ni| ni % 2 == 0)
}

/// x [M, K] · w_iᵀ (w_i [N_i, K]) for three weights in one launch (`inv_matmul_nt_bf16_thin_l3`
/// where [`thin_l_takes`] the three weights' column blocks together, else
/// `inv_matmul_nt_bf16_tc3`): [M · (N0 + N1 + N2)], the three [M, N_i] products back to back,
/// every element the bits of [`matmul_nt`]'s. bf16, within [`nt3_fits`].
pub(crate) fn matmul_nt3(sx: &CudaStorage, lx: &Layout, ws: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let mut n = [0usize; 3];
    for (i, (sw, lw)) in ws.iter().enumerate() {
        let (ni, ki) = lw.shape().dims2()?;
        if ki != k || sw.dtype() != DType::BF16 {
            candle_core::bail!("invariant matmul x3: weight {i} {:?} {:?} against x {:?} (bf16, the same K)", lw.dims(), sw.dtype(), lx.dims());
        }
        n[i] = ni;
    }
    let offs = [ws[0].1.start_offset(), ws[1].1.start_offset(), ws[2].1.start_offset()];
    if sx.dtype() != DType::BF16 || !nt3_fits(k, lx.start_offset(), offs, n) {
        candle_core::bail!("invariant matmul x3: x {:?} {:?} at offset {}, weights {n:?} at offsets {offs:?} (bf16, even N, aligned)", lx.dims(), sx.dtype(), lx.start_offset());
    }
    let dev = sx.device().clone();
    let total = m * (n[0] + n[1] + n[2]);
    // SAFETY: uninitialised, but the launch writes every element: its grid has a block per
    // column tile of each weight (ceil(N_i / tn) of them, the weights in order) and per tm rows,
    // and each stores the in-range elements of its tile in weight i's [M, N_i] part.
    let mut y = unsafe { dev.alloc::<bf16>(total.max(1))? };
    if total > 0 {
        let col_blocks = n.iter().map(|ni| ni.div_ceil(THIN_COLS)).sum();
        let (name, threads, tm, tn, smem) = if k % 16 == 0 && thin_l_takes(m, col_blocks, k) {
            ("inv_matmul_nt_bf16_thin_l3", THIN_THREADS, THIN_ROWS, THIN_COLS, 0)
        } else {
            ("inv_matmul_nt_bf16_tc3", TC_THREADS, TC_TILE.0, TC_TILE.1, TC_SMEM)
        };
        let gy = m.div_ceil(tm);
        if gy > 65535 {
            candle_core::bail!("invariant matmul x3: {m} rows exceed one launch (at most {} rows)", 65535 * tm);
        }
        let x = contiguous::<bf16>(sx, lx, "invariant matmul x3 x")?;
        let w: Vec<CudaView<bf16>> = ws.iter().map(|(sw, lw)| contiguous::<bf16>(sw, lw, "invariant matmul x3 w")).collect::<Result<_>>()?;
        let (m32, k32) = (u32_dim(m, "M")?, u32_dim(k, "K")?);
        let (n0, n1, n2) = (u32_dim(n[0], "N0")?, u32_dim(n[1], "N1")?, u32_dim(n[2], "N2")?);
        let f = func(&dev, name)?;
        f.allow_smem(smem)?;
        let mut b = f.builder();
        b.arg(&x).arg(&w[0]).arg(&w[1]).arg(&w[2]).arg(&mut y).arg(&m32).arg(&n0).arg(&n1).arg(&n2).arg(&k32);
        let blocks: usize = n.iter().map(|ni| ni.div_ceil(tn)).sum();
        let cfg = LaunchConfig { grid_dim: (u32_dim(blocks, "column blocks")?, gy as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // SAFETY: the arguments are those of `inv_matmul_nt_bf16_{thin_l3,tc3}(x, w0, w1, w2, y,
        // M, N0, N1, N2, K)` in order, all bf16 (checked). x is the contiguous [M, K], w_i the
        // contiguous [N_i, K] (K checked equal), y holds M · (N0 + N1 + N2) with every part
        // starting 4-byte aligned (even N_i: the tensor-core epilogue's paired stores); the
        // kernels bound-check every load and store as `thin_l` and `tc` do, whose alignment
        // needs are `nt3_fits`'s, checked above. `threads`, (tm, tn) and `smem` are each
        // kernel's launch bound, tile and dynamic shared memory (TC_SMEM, the limit raised to it
        // above; the thin one uses static shared memory only); gy is within the grid's limit.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(total)))
}

/// The experts' grouped product: x [A, K] (expert e's `counts[e]` rows back to back) · w[e]ᵀ
/// (w [E, N, K]) → [A, N], one launch for every expert, each element as the skinny kernels
/// compute it (invariant.cu).
pub(crate) fn grouped_nt(sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, counts: &[usize]) -> Result<(CudaStorage, Shape)> {
    let (a, k) = lx.shape().dims2()?;
    let (e, n, k2) = lw.shape().dims3()?;
    if k != k2 || counts.len() != e || counts.iter().sum::<usize>() != a {
        candle_core::bail!("invariant grouped matmul: x {:?}, w {:?}, counts of {} experts summing to {}", lx.dims(), lw.dims(), counts.len(), counts.iter().sum::<usize>());
    }
    if sx.dtype() != sw.dtype() {
        candle_core::bail!("invariant grouped matmul: x {:?} and w {:?} must share a dtype", sx.dtype(), sw.dtype());
    }
    let dev = sx.device().clone();
    let used = counts.iter().filter(|&&c| c > 0).count().max(1);
    let aligned = lx.start_offset() % 2 == 0 && lw.start_offset() % 2 == 0 && k % 16 == 0;
    let tc = tc_aligned(lx.start_offset(), lw.start_offset(), k);
    let (name, threads, tile_rows, tile_cols, smem) = grouped_kernel(sx.dtype(), a / used, aligned, tc)?;
    let mut tiles: Vec<u32> = Vec::new();
    let mut start = 0usize;
    for (ex, &c) in counts.iter().enumerate() {
        let mut r = 0;
        while r < c {
            let rows = tile_rows.min(c - r);
            tiles.extend([ex as u32, (start + r) as u32, rows as u32]);
            r += rows;
        }
        start += c;
    }
    let num_tiles = tiles.len() / 3;
    if num_tiles > 65535 || a > u32::MAX as usize {
        candle_core::bail!("invariant grouped matmul: {a} rows exceed one launch ({num_tiles} tiles, at most 65535)");
    }
    let t = if tiles.is_empty() { dev.alloc_zeros::<u32>(3)? } else { dev.clone_htod(&tiles)? };
    let out = launch_grouped(&dev, sx, lx, sw, lw, &t, num_tiles, (a, n, k), (name, threads, tile_cols, smem))?;
    Ok((out, Shape::from((a, n))))
}

/// The kernel (name, threads, tile rows, tile cols, dynamic shared memory bytes) of a dtype's
/// grouped product: for bf16, when the experts have `rows_per_expert` >= 32 on average
/// (training, prefill), the tensor-core 128 x 128-tile kernel (K % 8 = 0 and 16-byte aligned
/// rows: `tc_ok`) or else the 64 x 64-tile one; below 32 the thin ones (decode; K % 16 = 0
/// and 4-byte aligned rows: `thin_ok`) — x and w both through shared memory in 16-row tiles
/// where the rows are 16-byte aligned (`tc_ok`), else the register one up to 8 rows an expert
/// —, else the 16 x 16 one. All give every element the same bits.
fn grouped_kernel(dtype: DType, rows_per_expert: usize, thin_ok: bool, tc_ok: bool) -> Result<(&'static str, u32, usize, usize, u32)> {
    Ok(match dtype {
        DType::BF16 if rows_per_expert >= 32 && tc_ok => ("inv_grouped_nt_bf16_tc", TC_THREADS, TC_TILE.0, TC_TILE.1, TC_SMEM),
        DType::BF16 if rows_per_expert >= 32 => ("inv_grouped_nt_bf16_big", 128u32, 64usize, 64usize, 0),
        // x and w through shared memory, fragments by ldmatrix (16-byte cp.async: `tc_ok`'s
        // alignment), 16-row tiles
        DType::BF16 if thin_ok && tc_ok => ("inv_grouped_nt_bf16_thin_l", THIN_THREADS, THIN_ROWS, THIN_COLS, 0),
        DType::BF16 if thin_ok && rows_per_expert <= THIN_GROUPED_MAX_ROWS => ("inv_grouped_nt_bf16_thin", THIN_THREADS, THIN_ROWS, THIN_COLS, 0),
        DType::BF16 => ("inv_grouped_nt_bf16", 32u32, 16usize, 16usize, 0),
        DType::F32 => ("inv_grouped_nt_f32", 128, 8, 16, 0),
        other => candle_core::bail!("invariant grouped matmul: dtype {other:?} not supported on CUDA (f32, bf16)"),
    })
}

/// [`grouped_nt`] with the rows grouped by a deferred plan ([`Plan::build_deferred`]): the tile
/// table is built on the device from the plan's counts (`moe_tiles`), sized for the worst case
/// (A / tile rows + E tiles; unused entries are skipped), so nothing comes back to the host.
/// The same tiles as the host table, so the same bits.
pub(crate) fn grouped_nt_planned(sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, plan: &Plan) -> Result<(CudaStorage, Shape)> {
    let (a, k) = lx.shape().dims2()?;
    let (e, n, k2) = lw.shape().dims3()?;
    let Some((counts, pe)) = plan.device_counts() else {
        return grouped_nt(sx, lx, sw, lw, plan.host_counts()?);
    };
    if k != k2 || pe != e || a != plan.num_assignments {
        candle_core::bail!("invariant grouped matmul: x {:?}, w {:?}, a plan of {} rows over {pe} experts", lx.dims(), lw.dims(), plan.num_assignments);
    }
    if sx.dtype() != sw.dtype() {
        candle_core::bail!("invariant grouped matmul: x {:?} and w {:?} must share a dtype", sx.dtype(), sw.dtype());
    }
    let aligned = lx.start_offset() % 2 == 0 && lw.start_offset() % 2 == 0 && k % 16 == 0;
    let tc = tc_aligned(lx.start_offset(), lw.start_offset(), k);
    let (name, threads, tile_rows, tile_cols, smem) = grouped_kernel(sx.dtype(), a / e.max(1), aligned, tc)?;
    let max_tiles = a.div_ceil(tile_rows) + e;
    if max_tiles > 65535 || e > 4096 || a > u32::MAX as usize {
        // too many for one launch's grid / the table kernel's shared memory: the host table
        return grouped_nt(sx, lx, sw, lw, plan.host_counts()?);
    }
    let dev = sx.device().clone();
    // SAFETY: uninitialised, but `moe_tiles` writes all 3 · max_tiles entries: the tiles of
    // every expert (at most max_tiles of them, as the counts of in-range ids sum to at most A)
    // and zeros after them.
    let mut tiles = unsafe { dev.alloc::<u32>(3 * max_tiles)? };
    {
        let f = func(&dev, "moe_tiles")?;
        let (e32, tr32, mt32) = (e as u32, tile_rows as u32, max_tiles as u32);
        let mut b = f.builder();
        b.arg(&counts).arg(&e32).arg(&tr32).arg(&mt32).arg(&mut tiles);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 8 * e32 };
        // SAFETY: the arguments are those of `moe_tiles(counts, E, tile_rows, max_tiles, tiles)`
        // (invariant.cu) in order: counts holds the plan's E expert bins, tiles 3 · max_tiles
        // words, and the kernel never writes a tile index >= max_tiles. Its dynamic shared memory
        // is 2 E words (E <= 4096 checked: 32 KiB).
        unsafe { b.launch(cfg) }.w()?;
    }
    let out = launch_grouped(&dev, sx, lx, sw, lw, &tiles, max_tiles, (a, n, k), (name, threads, tile_cols, smem))?;
    Ok((out, Shape::from((a, n))))
}

/// One launch of a grouped kernel over a tile table of `num_tiles` entries on the device.
#[allow(clippy::too_many_arguments)]
fn launch_grouped(dev: &CudaDevice, sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, tiles: &CudaSlice<u32>, num_tiles: usize, (a, n, k): (usize, usize, usize), (name, threads, tile_cols, smem): (&str, u32, usize, u32)) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(dev: &CudaDevice, sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, t: &CudaSlice<u32>, num_tiles: usize, (a, n, k): (usize, usize, usize), (name, threads, tile_cols, smem): (&str, u32, usize, u32)) -> Result<CudaSlice<T>> {
        let (x, w) = (contiguous::<T>(sx, lx, "grouped matmul x")?, contiguous::<T>(sw, lw, "grouped matmul w")?);
        // SAFETY: uninitialised, but the launch writes every y[a, n]: the tile table covers each
        // expert's rows exactly once (built from the counts, which sum to A) and the grid has a
        // block per (tile_cols-column tile, row tile); A · N = 0 returns a never-read buffer.
        let mut y = unsafe { dev.alloc::<T>((a * n).max(1))? };
        if a * n == 0 || num_tiles == 0 {
            return Ok(y);
        }
        let f = func(dev, name)?;
        f.allow_smem(smem)?;
        let (n32, k32) = (u32_dim(n, "N")?, u32_dim(k, "K")?);
        let mut b = f.builder();
        b.arg(&x).arg(&w).arg(&mut y).arg(t).arg(&n32).arg(&k32);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(tile_cols) as u32, num_tiles as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // SAFETY: the arguments are those of `inv_grouped_nt_*(x, w, y, tiles, N, K)` in order, T
        // its element type (x and w checked to share it). x is the contiguous [A, K], w the
        // contiguous [E, N, K] and y holds A · N; every tile's (expert < E, first row, rows <=
        // the kernel's tile rows) lies inside x's A rows (the table is built from counts summing
        // to A; entries with rows = 0 are skipped), and the kernel bound-checks rows, n < N and
        // k < K on every load and store (the tensor-core and shared-memory thin kernels, chosen
        // only for K % 8 = 0 and start offsets that are multiples of 8 elements — every row and
        // expert matrix 16-byte aligned —, copy 16-byte chunks with cp.async and read nothing for
        // one out of range: src-size 0 from the base pointer). `threads` is the kernel's launch bound, `smem` the
        // dynamic shared memory the tensor-core kernel indexes (TC_SMEM, the function's limit
        // raised to it above; 0 for the others); gridDim.y <= 65535 (checked by the callers).
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }
    Ok(match sx.dtype() {
        DType::BF16 => CudaStorage::wrap_cuda_slice(go::<bf16>(dev, sx, lx, sw, lw, tiles, num_tiles, (a, n, k), (name, threads, tile_cols, smem))?, dev.clone()),
        _ => CudaStorage::wrap_cuda_slice(go::<f32>(dev, sx, lx, sw, lw, tiles, num_tiles, (a, n, k), (name, threads, tile_cols, smem))?, dev.clone()),
    })
}
