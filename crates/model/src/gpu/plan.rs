//! The dispatch plan of one MoE layer on the GPU: where every assignment's row goes in the
//! expert-sorted buffer, and which assignments every token sums in the combine.
//!
//! Built on the device from the routing decision's `token_A` / `expert_A` (no host copy of the
//! route): a histogram of experts, a stable per-expert rank (`pos_A`), and a token CSR sorted by
//! assignment index (a fixed summation order). Only the E expert counts come back to the host:
//! cuBLAS needs each expert's row count to size its GEMMs; under the batch-invariant kernels
//! not even those (`Plan::build_deferred`: the grouped products build their tile tables on the
//! device), so a decode step's layers run without a host round trip.
//!
//! Legend: N tokens, E experts, A assignments, R expert-sorted rows.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Result, Storage, Tensor};

use super::{func, GemmImpl};

/// Row layout of the expert-sorted buffer.
#[derive(Debug, Clone)]
pub(crate) struct RowLayout {
    /// rows (assignments) of each expert
    pub(crate) counts: Vec<usize>,
    /// first row of each expert
    pub(crate) offsets: Vec<usize>,
    /// total rows R
    pub(crate) rows: usize,
    /// padded layout: every expert owns `padded` rows (offsets e · padded), the unused ones zero
    pub(crate) padded: Option<usize>,
}

impl RowLayout {
    /// The layout for `imp`, and the implementation `Auto` resolves to.
    pub(crate) fn new(counts: Vec<usize>, imp: GemmImpl) -> (Self, GemmImpl) {
        let imp = match imp {
            GemmImpl::Auto => {
                let total: usize = counts.iter().sum();
                let padded = counts.iter().copied().max().unwrap_or(0).div_ceil(8) * 8 * counts.len();
                if total > 0 && 2 * padded <= 3 * total { GemmImpl::Padded } else { GemmImpl::Grouped }
            }
            other => other,
        };
        let layout = match imp {
            GemmImpl::Padded => {
                let max = counts.iter().copied().max().unwrap_or(0);
                let padded = max.div_ceil(8) * 8;
                let offsets = (0..counts.len()).map(|e| e * padded).collect();
                Self { rows: padded * counts.len(), counts, offsets, padded: Some(padded) }
            }
            GemmImpl::Grouped | GemmImpl::Loop | GemmImpl::Auto => {
                let offsets = crate::moe::dispatch::starts(&counts);
                Self { rows: counts.iter().sum(), counts, offsets, padded: None }
            }
        };
        (layout, imp)
    }
}

/// Everything the dispatch / combine kernels and the grouped GEMMs need for one layer.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) dev: CudaDevice,
    pub(crate) imp: GemmImpl,
    pub(crate) layout: RowLayout,
    pub(crate) num_tokens: usize,
    pub(crate) num_assignments: usize,
    /// [A] token of each assignment
    pub(crate) token_A: CudaSlice<u32>,
    /// [A] row of each assignment in the expert-sorted buffer
    pub(crate) pos_A: CudaSlice<u32>,
    /// [N + 1] token CSR offsets into `list`
    pub(crate) toff: CudaSlice<u32>,
    /// [A] assignments grouped by token, ascending within a token
    pub(crate) list: CudaSlice<u32>,
    /// every assignment is its own token and already sits at its row (`pos_A[a] = a`, compact
    /// layout): the dispatch permute and the per-token sums are copies, so the ops skip them
    pub(crate) identity: bool,
    /// built without a copy back ([`Plan::build_deferred`]): the counts are on the device and
    /// `layout.counts` / `layout.offsets` are empty
    pub(crate) deferred: Option<Deferred>,
}

/// An owned copy of a u32 tensor's data on `dev` (contiguous).
fn u32_slice(t: &Tensor, dev: &CudaDevice) -> Result<CudaSlice<u32>> {
    let t = t.to_dtype(DType::U32)?.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else { candle_core::bail!("moe plan: route tensors must live on the CUDA device") };
    let n = l.shape().elem_count();
    let src = cs.as_cuda_slice::<u32>()?.slice(l.start_offset()..l.start_offset() + n);
    // SAFETY: uninitialised, but `memcpy_dtod` fills all n entries; n = 0 leaves one entry that
    // nothing reads (every kernel over the assignments is skipped when A = 0).
    let mut dst = unsafe { dev.alloc::<u32>(n.max(1))? };
    if n > 0 {
        dev.memcpy_dtod(&src, &mut dst)?;
    }
    Ok(dst)
}

fn grid(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 65535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl Plan {
    /// Plan a layer from its assignments (`token_A`, `expert_A`, [A] u32 on the device); the E
    /// expert counts come back to the host (cuBLAS sizes its GEMMs by them), checked.
    pub(crate) fn build(token_A: &Tensor, expert_A: &Tensor, num_tokens: usize, num_experts: usize, imp: GemmImpl) -> Result<Self> {
        Self::build_with(token_A, expert_A, num_tokens, num_experts, Some(imp))
    }

    /// [`Plan::build`] with nothing copied back: the counts stay on the device (the row offsets
    /// are scanned there, the invariant grouped products build their tile tables there), so
    /// the host can go on enqueueing the layer. The layout is compact (R = A). The ids must be
    /// in range — they are: a computed route comes from the device top-k / expert choice (ids
    /// < E by construction) and a forced one passed `route_check_*` before the plan — and the
    /// kernels stay in bounds even if they were not (unplanned rows are zero, not garbage);
    /// [`Plan::host_counts`] (a backward, expert parallelism) copies the counts back and checks.
    pub(crate) fn build_deferred(token_A: &Tensor, expert_A: &Tensor, num_tokens: usize, num_experts: usize) -> Result<Self> {
        Self::build_with(token_A, expert_A, num_tokens, num_experts, None)
    }

    fn build_with(token_A: &Tensor, expert_A: &Tensor, num_tokens: usize, num_experts: usize, imp: Option<GemmImpl>) -> Result<Self> {
        let dev = match token_A.device() {
            candle_core::Device::Cuda(d) => d.clone(),
            _ => candle_core::bail!("moe plan: not a CUDA tensor"),
        };
        let a = token_A.elem_count();
        if expert_A.elem_count() != a {
            candle_core::bail!("moe plan: {} tokens but {} experts in the assignments", a, expert_A.elem_count());
        }
        let token = u32_slice(token_A, &dev)?;
        let expert = u32_slice(expert_A, &dev)?;
        let (a32, e32, n32) = (a as u32, num_experts as u32, num_tokens as u32);
        if imp.is_none() && a > 0 && a <= SMALL_ASSIGNMENTS && small_smem(num_experts, num_tokens) <= SMALL_SMEM {
            return Self::build_small(dev, token, expert, num_tokens, num_experts);
        }

        // one buffer: expert histogram [E + 1] then token histogram [N + 1]; the last bin of
        // each counts ids out of range
        let mut hist = dev.alloc_zeros::<u32>(num_experts + num_tokens + 2)?;
        for (keys, lo, hi, nk) in [(&expert, 0, num_experts + 1, e32), (&token, num_experts + 1, num_experts + num_tokens + 2, n32)] {
            if a == 0 {
                break;
            }
            let f = func(&dev, "moe_histogram")?;
            let mut bins = hist.slice_mut(lo..hi);
            let mut b = f.builder();
            b.arg(keys).arg(&a32).arg(&mut bins).arg(&nk);
            // SAFETY: the arguments are those of `moe_histogram(key_A, A, counts, num_keys)`
            // (kernels.cu) in order: keys holds A ids, bins is the num_keys + 1 bins lo..hi of
            // `hist`, and the kernel sends every id >= num_keys to the last bin, so its atomic
            // adds stay within the slice. Grid-strided: any grid size is valid.
            unsafe { b.launch(grid(a, 256)) }.w()?;
        }
        let (layout, imp, offsets, deferred) = match imp {
            Some(imp) => {
                let host = dev.clone_dtoh(&hist)?;
                check_bins(&host, num_experts, num_tokens)?;
                let (layout, imp) = RowLayout::new(host[..num_experts].iter().map(|&c| c as usize).collect(), imp);
                let offsets: Vec<u32> = layout.offsets.iter().map(|&o| o as u32).collect();
                let offsets = if offsets.is_empty() { dev.alloc_zeros::<u32>(1)? } else { dev.clone_htod(&offsets)? };
                (layout, imp, offsets, false)
            }
            None => {
                // SAFETY: uninitialised, but `moe_exclusive_scan` writes all E + 1 entries.
                let mut offsets = unsafe { dev.alloc::<u32>(num_experts + 1)? };
                let f = func(&dev, "moe_exclusive_scan")?;
                let counts = hist.slice(0..num_experts);
                let mut b = f.builder();
                b.arg(&counts).arg(&e32).arg(&mut offsets);
                let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the arguments are those of `moe_exclusive_scan(in, n, out)` in order: the
                // E expert bins of `hist`, offsets holds E + 1. One block of 1024 threads, the size
                // of the kernel's `part[1024]`.
                unsafe { b.launch(cfg) }.w()?;
                let layout = RowLayout { counts: Vec::new(), offsets: Vec::new(), rows: a, padded: None };
                (layout, GemmImpl::Grouped, offsets, true)
            }
        };

        // stable rank of every assignment within its expert
        // SAFETY: uninitialised, but `moe_positions` writes pos_A[a] for every a: it runs one block
        // per expert over all A assignments, and every expert id is < E (the histogram check above
        // bailed otherwise); A = 0: never read.
        // (deferred: zeroed, so an id out of range leaves its entry at row 0, inside the buffer)
        let mut pos = if deferred { dev.alloc_zeros::<u32>(a.max(1))? } else { unsafe { dev.alloc::<u32>(a.max(1))? } };
        if a > 0 {
            let f = func(&dev, "moe_positions")?;
            let mut b = f.builder();
            b.arg(&expert).arg(&a32).arg(&offsets).arg(&mut pos);
            let cfg = LaunchConfig { grid_dim: (e32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments are those of `moe_positions(expert_A, A, row_offset, pos_A)` in
            // order: expert holds A ids < E, offsets E row offsets (one per block; E >= 1 here:
            // with E = 0 every one of the A > 0 ids would have failed the check), pos A entries. 1024 threads are the 32 warps of the
            // kernel's `warp_tot[32]`. The rows written, offsets[e] + rank < offsets[e] + counts[e],
            // stay below R.
            unsafe { b.launch(cfg) }.w()?;
        }

        // token CSR (checked: a token id >= N lands in the overflow bin)
        // SAFETY: uninitialised, but `moe_exclusive_scan` writes out[0] and out[i + 1] for every
        // i < N: all N + 1 entries.
        let mut toff = unsafe { dev.alloc::<u32>(num_tokens + 1)? };
        {
            let f = func(&dev, "moe_exclusive_scan")?;
            let tcount = hist.slice(num_experts + 1..num_experts + 1 + num_tokens);
            let mut b = f.builder();
            b.arg(&tcount).arg(&n32).arg(&mut toff);
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments are those of `moe_exclusive_scan(in, n, out)` in order: tcount
            // is the N token bins of `hist`, toff holds N + 1. One block of 1024 threads, the size
            // of the kernel's `part[1024]` (it splits any n into 1024 chunks).
            unsafe { b.launch(cfg) }.w()?;
        }
        // SAFETY: uninitialised, but `moe_token_fill` writes every entry: all token ids are < N
        // (checked above), so the token counts sum to A and each assignment takes its own slot
        // toff[n] + (its place among token n's) in 0..A; A = 0: never read.
        // (deferred: zeroed, so a skipped token id >= N leaves an in-range entry)
        let mut list = if deferred { dev.alloc_zeros::<u32>(a.max(1))? } else { unsafe { dev.alloc::<u32>(a.max(1))? } };
        if a > 0 {
            let mut cursor = dev.alloc_zeros::<u32>(num_tokens.max(1))?;
            let f = func(&dev, "moe_token_fill")?;
            let mut b = f.builder();
            b.arg(&token).arg(&a32).arg(&n32).arg(&toff).arg(&mut cursor).arg(&mut list);
            // SAFETY: the arguments are those of `moe_token_fill(token_A, A, N, toff, cursor, list)` in
            // order: token ids are < N (checked above), cursor holds N zeroed counters, and since
            // exactly counts[n] assignments name token n, toff[n] + slot < toff[n + 1] <= A = the
            // length of list.
            unsafe { b.launch(grid(a, 256)) }.w()?;
            let f = func(&dev, "moe_token_sort")?;
            let mut b = f.builder();
            b.arg(&toff).arg(&n32).arg(&mut list);
            // SAFETY: the arguments are those of `moe_token_sort(toff, N, list)` in order: toff
            // holds N + 1 offsets, and every token's range toff[n]..toff[n + 1] lies within list's
            // A entries (the scan of counts summing to A). Grid-strided over N.
            unsafe { b.launch(grid(num_tokens, 256)) }.w()?;
        }
        let deferred = deferred.then(|| Deferred { hist, num_experts, counts: std::sync::OnceLock::new() });
        Ok(Self { dev, imp, layout, num_tokens, num_assignments: a, token_A: token, pos_A: pos, toff, list, identity: false, deferred })
    }

    /// [`Plan::build_deferred`] of a small batch (a decode step) in one launch
    /// (`moe_plan_small`): the same plan, bit for bit, with 1 launch instead of 7 and no
    /// memsets.
    fn build_small(dev: CudaDevice, token: CudaSlice<u32>, expert: CudaSlice<u32>, num_tokens: usize, num_experts: usize) -> Result<Self> {
        let a = token.len();
        // SAFETY (all four): uninitialised, but `moe_plan_small` writes every entry: all
        // E + N + 2 bins of hist, pos_A and list in full (zeros first, then the planned
        // entries), toff[0..=N].
        let mut hist = unsafe { dev.alloc::<u32>(num_experts + num_tokens + 2)? };
        let mut pos = unsafe { dev.alloc::<u32>(a)? };
        let mut toff = unsafe { dev.alloc::<u32>(num_tokens + 1)? };
        let mut list = unsafe { dev.alloc::<u32>(a)? };
        let (a32, e32, n32) = (a as u32, num_experts as u32, num_tokens as u32);
        let f = func(&dev, "moe_plan_small")?;
        let mut b = f.builder();
        b.arg(&token).arg(&expert).arg(&a32).arg(&e32).arg(&n32).arg(&mut hist).arg(&mut pos).arg(&mut toff).arg(&mut list);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: small_smem(num_experts, num_tokens) as u32 };
        // SAFETY: the arguments are those of `moe_plan_small(token_A, expert_A, A, E, N, hist,
        // pos_A, toff, list)` in order: token and expert hold A ids (any values: ids out of
        // range go to the overflow bins and are skipped), hist E + N + 2 bins, pos and list A,
        // toff N + 1. One block of 1024 threads (its launch bound: 32 warps), and the dynamic
        // shared memory holds its E + N + 2 bins and E + 1 offsets (`small_smem`, within the
        // 48 KiB every launch may take).
        unsafe { b.launch(cfg) }.w()?;
        let layout = RowLayout { counts: Vec::new(), offsets: Vec::new(), rows: a, padded: None };
        let deferred = Some(Deferred { hist, num_experts, counts: std::sync::OnceLock::new() });
        Ok(Self { dev, imp: GemmImpl::Grouped, layout, num_tokens, num_assignments: a, token_A: token, pos_A: pos, toff, list, identity: false, deferred })
    }

    /// The rows of each expert on the host: the layout's, or (a deferred plan) copied back
    /// once and checked (ids out of range are an error here).
    pub(crate) fn host_counts(&self) -> Result<&[usize]> {
        let Some(d) = &self.deferred else { return Ok(&self.layout.counts) };
        if let Some(c) = d.counts.get() {
            return Ok(c);
        }
        let host = self.dev.clone_dtoh(&d.hist)?;
        check_bins(&host, d.num_experts, self.num_tokens)?;
        let counts = host[..d.num_experts].iter().map(|&c| c as usize).collect();
        Ok(d.counts.get_or_init(|| counts))
    }

    /// A deferred plan's expert counts on the device ([E] u32).
    pub(crate) fn device_counts(&self) -> Option<(candle_core::cuda_backend::cudarc::driver::CudaView<'_, u32>, usize)> {
        self.deferred.as_ref().map(|d| (d.hist.slice(0..d.num_experts), d.num_experts))
    }

    /// Plan rows that arrive grouped by source, each source's rows grouped by expert
    /// (expert parallelism, after the all-to-all): `counts_SE[s · E + e]` rows of expert `e`
    /// from source `s`, sources in order. Every row is its own token; the plan's rows are
    /// grouped by expert, sources in order within an expert (a stable sort of the rows by
    /// expert). Built on the host from the counts (no copy back); when that order is the
    /// arrival order and the layout is compact, the plan is the identity.
    pub(crate) fn sorted_rows(dev: &CudaDevice, counts_SE: &[usize], num_experts: usize, imp: GemmImpl) -> Result<Self> {
        if num_experts == 0 || counts_SE.len() % num_experts != 0 {
            candle_core::bail!("moe plan: {} row counts are not whole sources of {num_experts} experts", counts_SE.len());
        }
        let counts = crate::moe::dispatch::expert_counts(counts_SE, num_experts);
        let r: usize = counts.iter().sum();
        let (layout, imp) = RowLayout::new(counts, imp);
        let pos = crate::moe::dispatch::expert_major_rows(counts_SE, &layout.offsets);
        let identity = layout.padded.is_none() && pos.iter().enumerate().all(|(a, &p)| p as usize == a);
        let arange: Vec<u32> = (0..=r as u32).collect();
        let upload = |v: &[u32]| -> Result<CudaSlice<u32>> {
            if v.is_empty() {
                return dev.alloc_zeros::<u32>(1);
            }
            dev.clone_htod(v)
        };
        Ok(Self {
            dev: dev.clone(),
            imp,
            layout,
            num_tokens: r,
            num_assignments: r,
            token_A: upload(&arange[..r])?,
            pos_A: upload(&pos)?,
            toff: upload(&arange)?,
            list: upload(&arange[..r])?,
            identity,
            deferred: None,
        })
    }
}

/// The counts of a deferred plan: the histogram buffer, and its host copy once made.
#[derive(Debug)]
pub(crate) struct Deferred {
    /// expert bins [E + 1] then token bins [N + 1] (the last of each: ids out of range)
    hist: CudaSlice<u32>,
    num_experts: usize,
    counts: std::sync::OnceLock<Vec<usize>>,
}

/// The most assignments [`Plan::build_small`] takes (its positions cost E · A / 32 ballots over
/// 32 warps: ≈ 2 µs at a 64-request decode step of 128 experts × top-8).
const SMALL_ASSIGNMENTS: usize = 2048;
/// The dynamic shared memory a launch may take without opting in.
const SMALL_SMEM: usize = 48 * 1024;

/// `moe_plan_small`'s shared memory: E + N + 2 bins and E + 1 offsets.
fn small_smem(num_experts: usize, num_tokens: usize) -> usize {
    (2 * num_experts + num_tokens + 3) * 4
}

/// The histogram's overflow bins must be empty.
fn check_bins(host: &[u32], num_experts: usize, num_tokens: usize) -> Result<()> {
    if host[num_experts] > 0 {
        candle_core::bail!("moe plan: {} assignments name an expert id >= num_experts ({num_experts})", host[num_experts]);
    }
    let bad_tokens = host[num_experts + num_tokens + 1];
    if bad_tokens > 0 {
        candle_core::bail!("moe plan: {bad_tokens} assignments name a token >= the {num_tokens} tokens of the batch");
    }
    Ok(())
}
