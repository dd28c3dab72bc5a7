//! The routing stage on the GPU (kernels in `route.cu`): token-choice top-k (plain, biased and
//! group-limited), expert-choice selection, and the checks of forced routes, so that routing,
//! recording and replaying a layer need no host round trip. The host versions in
//! `moe::router::select` define the semantics; these give the same ids (total order on f32,
//! larger first, ties to the lower index). Also the launches of the fused router ops of
//! `moe::router::fused` (softmax, top-k weights, token map), whose module doc defines them.
//!
//! Legend: N tokens, E experts, G expert groups, K experts per token, P pools, A assignments,
//! R rows.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::ops::contiguous;
use super::route_func;

fn f32_rows<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    if s.dtype() != DType::F32 {
        candle_core::bail!("{what}: scores must be f32, got {:?}", s.dtype());
    }
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
        None => candle_core::bail!("{what}: scores must be contiguous"),
    }
}

/// ids_NK (u32) = the K best of each row of choice_NE; group-limited when `groups > 1`.
pub(crate) fn top_k(s: &CudaStorage, l: &Layout, groups: usize, topk_group: usize, k: usize) -> Result<(CudaStorage, Shape)> {
    let (n, e) = l.shape().dims2()?;
    if e > 1024 || k > e || groups == 0 || e % groups != 0 || topk_group > groups {
        candle_core::bail!("route top-k: {e} experts, {groups} groups, top-{topk_group} groups, top-{k}: unsupported (E <= 1024)");
    }
    let dev = s.device().clone();
    let choice = f32_rows(s, l, "route top-k")?;
    // SAFETY: uninitialised, but the launch writes ids[n, k] for every n < N and k < K (lane 0
    // of token n's warp, ceil(N / 4) blocks of 4 warps); N · K = 0: never read.
    let mut ids = unsafe { dev.alloc::<u32>((n * k).max(1))? };
    if n > 0 && k > 0 {
        let warps = 4u32;
        let f = route_func(&dev, "route_topk")?;
        let mut b = f.builder();
        let (n32, e32, g32, kg32, k32) = (n as u32, e as u32, groups as u32, topk_group as u32, k as u32);
        b.arg(&choice).arg(&n32).arg(&e32).arg(&g32).arg(&kg32).arg(&k32).arg(&mut ids);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(warps as usize) as u32, 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: warps * 4 * (e32 + 2 * g32),
        };
        // SAFETY: the arguments are those of `route_topk(choice_NE, N, E, G, KG, K, ids_NK)`
        // (route.cu) in order. choice is the contiguous [N, E] f32 input (`f32_rows` checks dtype
        // and layout), ids holds N · K. The checks above keep the kernel in bounds: E <= 1024, so
        // its `taken` mask (32 bits of 32 experts a lane) covers every expert; E % G = 0 (whole
        // groups) and KG <= G (each group round finds a group not yet kept); K <= E. The dynamic
        // shared memory is the kernel's (E + 2G) words per warp, for the 4 warps of the block
        // (at most 48 KiB, as G <= E <= 1024).
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(ids, dev), Shape::from((n, k))))
}

/// Expert choice over `pools` (token slots, ascending) with capacities `caps`: [2, A] u32,
/// row 0 the token slots, row 1 the experts, ordered by expert, pool, then preference.
pub(crate) fn expert_choice(s: &CudaStorage, l: &Layout, pools: &[Vec<u32>], caps: &[usize]) -> Result<(CudaStorage, Shape)> {
    let (_, e) = l.shape().dims2()?;
    let dev = s.device().clone();
    let choice = f32_rows(s, l, "expert choice")?;
    let per_expert: usize = caps.iter().sum();
    let a = per_expert * e;
    let mut pool_off = Vec::with_capacity(pools.len() + 1);
    let mut slots = Vec::new();
    pool_off.push(0u32);
    for p in pools {
        slots.extend_from_slice(p);
        pool_off.push(slots.len() as u32);
    }
    let np = pools.len();
    let mut out_off = Vec::with_capacity(e * np);
    for x in 0..e {
        let mut acc = x * per_expert;
        for &c in caps {
            out_off.push(acc as u32);
            acc += c;
        }
    }
    // SAFETY: uninitialised; the kernel writes ranks 0..caps[p] of every (pool p, expert e) pair
    // into out_off[e · P + p].., so every entry of both rows, provided each pool has at least
    // caps[p] distinct slots (ranks are distinct: no two packed keys tie). That, and slots < N
    // (the rows of choice), caps.len() = pools.len(), are the caller's: `moe::router::
    // expert_choice` builds the pools from the batch's slots and caps = min(P, ...). They are
    // not re-checked here. A = 0: never read.
    let mut out = unsafe { dev.alloc::<u32>((2 * a).max(1))? };
    if a > 0 {
        let pool_off = dev.clone_htod(&pool_off)?;
        let slots = dev.clone_htod(&slots)?;
        let caps32: Vec<u32> = caps.iter().map(|&c| c as u32).collect();
        let caps_d = dev.clone_htod(&caps32)?;
        let out_off = dev.clone_htod(&out_off)?;
        let (mut tok, mut exp) = out.split_at_mut(a);
        let f = route_func(&dev, "route_expert_choice")?;
        let mut b = f.builder();
        let (e32, np32) = (e as u32, np as u32);
        b.arg(&choice).arg(&e32).arg(&pool_off).arg(&slots).arg(&caps_d).arg(&out_off).arg(&np32).arg(&mut tok).arg(&mut exp);
        let cfg = LaunchConfig { grid_dim: (np32, e32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `route_expert_choice(choice_NE, E, pool_off, slots,
        // cap_P, out_off, P, token_A, expert_A)` in order. pool_off has P + 1 offsets into slots,
        // caps_d and out_off P and E · P entries (with caps.len() = P, see the allocation);
        // out_off[e · P + p] + caps[p] <= (e + 1) · Σ caps <= A, so the writes stay in tok and exp
        // (A entries each); reads of choice_NE[slot · E + e] need every slot < N (see above).
        // 256 threads match the kernel's 256-entry shared tile; A > 0 means P, E >= 1.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, a))))
}

/// A forced route to check on the device.
pub(crate) enum Forced<'a> {
    /// [N, K] u32 ids (ROUTE_FREE rows allowed)
    TopK(&'a Tensor),
    /// [A] token slots and [A] experts
    Pairs(&'a Tensor, &'a Tensor),
}

fn slice_u32<'a>(t: &'a Tensor, what: &str) -> Result<(impl std::ops::Deref<Target = Storage> + 'a, usize, usize)> {
    if t.dtype() != DType::U32 {
        candle_core::bail!("{what}: expected u32 ids, got {:?}", t.dtype());
    }
    let (st, l) = t.storage_and_layout();
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what}: ids must be contiguous") };
    Ok((st, a, b))
}

/// Count the faults of every forced route with one copy back to the host: per route, [3]
/// counts (top-k: rows mixing ROUTE_FREE and ids, rows with an id >= E, rows naming an expert
/// twice; pairs: tokens >= N, experts >= E, pairs given twice). All tensors on `dev`,
/// contiguous u32.
pub(crate) fn check_forced(dev: &CudaDevice, routes: &[Forced<'_>], num_tokens: usize, num_experts: usize) -> Result<Vec<[u32; 3]>> {
    if routes.is_empty() {
        return Ok(Vec::new());
    }
    let mut bad = dev.alloc_zeros::<u32>(3 * routes.len())?;
    let (n32, e32) = (num_tokens as u32, num_experts as u32);
    for (i, r) in routes.iter().enumerate() {
        let mut out = bad.slice_mut(3 * i..3 * i + 3);
        match r {
            Forced::TopK(ids) => {
                let (n, k) = ids.dims2()?;
                if n == 0 || k == 0 {
                    continue;
                }
                let (st, a, b) = slice_u32(ids, "forced ids")?;
                let Storage::Cuda(cs) = &*st else { candle_core::bail!("forced ids: not on the CUDA device") };
                let view = cs.as_cuda_slice::<u32>()?.slice(a..b);
                let f = route_func(dev, "route_check_topk")?;
                let mut bl = f.builder();
                let (nn, kk) = (n as u32, k as u32);
                bl.arg(&view).arg(&nn).arg(&kk).arg(&e32).arg(&mut out);
                // SAFETY: the arguments are those of `route_check_topk(ids_NK, N, K, E, bad)` in
                // order: view is the contiguous [N, K] u32 ids (`slice_u32` checks dtype and
                // layout), out this route's 3 counters. The kernel reads rows n < N only, grid-
                // strided, and ids >= E are only counted, never used as indices.
                unsafe { bl.launch(grid(n)) }.w()?;
            }
            Forced::Pairs(tok, exp) => {
                let a_len = tok.elem_count();
                if a_len == 0 || exp.elem_count() != a_len {
                    continue; // lengths are checked on the host
                }
                let (st_t, ta, tb) = slice_u32(tok, "forced token_A")?;
                let (st_e, ea, eb) = slice_u32(exp, "forced expert_A")?;
                let (Storage::Cuda(ct), Storage::Cuda(ce)) = (&*st_t, &*st_e) else {
                    candle_core::bail!("forced assignments: not on the CUDA device")
                };
                let tv = ct.as_cuda_slice::<u32>()?.slice(ta..tb);
                let ev = ce.as_cuda_slice::<u32>()?.slice(ea..eb);
                let mut seen: CudaSlice<u32> = dev.alloc_zeros::<u32>((num_tokens * num_experts).div_ceil(32).max(1))?;
                let f = route_func(dev, "route_check_pairs")?;
                let mut bl = f.builder();
                let a32 = a_len as u32;
                bl.arg(&tv).arg(&ev).arg(&a32).arg(&n32).arg(&e32).arg(&mut seen).arg(&mut out);
                // SAFETY: the arguments are those of `route_check_pairs(token_A, expert_A, A, N, E,
                // seen, bad)` in order: tv and ev are contiguous u32 of A entries each (equal
                // lengths checked above), `seen` a zeroed bitmap of ceil(N · E / 32) words, whose
                // bit t · E + x the kernel sets only after checking t < N and x < E; out is this
                // route's 3 counters.
                unsafe { bl.launch(grid(a_len)) }.w()?;
            }
        }
    }
    let host = dev.clone_dtoh(&bad)?;
    Ok(host.chunks(3).map(|c| [c[0], c[1], c[2]]).collect())
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds u32")))
}

/// Warps (rows) per block of `route_softmax_f32` (its SOFTMAX_WARPS).
const SOFTMAX_WARPS: usize = 4;

/// softmax over the last dim of a contiguous f32 tensor (`fused::softmax`): same shape, f32.
pub(crate) fn softmax(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    if s.dtype() != DType::F32 {
        candle_core::bail!("router softmax: logits must be f32, got {:?}", s.dtype());
    }
    let e = *l.dims().last().unwrap_or(&0);
    let rows = l.shape().elem_count().checked_div(e).unwrap_or(0);
    let dev = s.device().clone();
    let x = contiguous::<f32>(s, l, "router softmax logits")?;
    // SAFETY: uninitialised, but the launch writes out[r, 0..E] for every row r < R (one warp per
    // row); R · E = 0: never read.
    let mut out = unsafe { dev.alloc::<f32>((rows * e).max(1))? };
    if rows * e > 0 {
        let (r32, e32) = (u32_of(rows, "router softmax rows")?, u32_of(e, "router softmax row width")?);
        let blocks = u32_of(rows.div_ceil(SOFTMAX_WARPS), "router softmax blocks")?;
        let f = route_func(&dev, "route_softmax_f32")?;
        let mut b = f.builder();
        b.arg(&x).arg(&r32).arg(&e32).arg(&mut out);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * SOFTMAX_WARPS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `route_softmax_f32(x_RE, R, E, out_RE)` in order: x
        // is the contiguous f32 input of R · E values (dtype checked above, layout by
        // `contiguous`), out holds R · E. ceil(R / 4) blocks of 4 warps (the kernel's launch
        // bound); warps of rows past R return at once.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
}

/// (scores_NE f32, ids_NK u32) → [2, N, K] f32, probs then weights (`fused::topk_weights`):
/// `renorm` 0 none, 1 by the sum, 2 by the sum + `eps`; `scale` applied when given.
pub(crate) fn topk_weights(
    ss: &CudaStorage,
    ls: &Layout,
    si: &CudaStorage,
    li: &Layout,
    renorm: u32,
    eps: f32,
    scale: Option<f32>,
) -> Result<(CudaStorage, Shape)> {
    let (n, e) = ls.shape().dims2()?;
    let (n_ids, k) = li.shape().dims2()?;
    if n != n_ids || ss.dtype() != DType::F32 || si.dtype() != DType::U32 {
        candle_core::bail!("router top-k weights: scores {:?} {:?} with ids {:?} {:?} (f32 [N, E], u32 [N, K])", ss.dtype(), ls.dims(), si.dtype(), li.dims());
    }
    let dev = ss.device().clone();
    let scores = contiguous::<f32>(ss, ls, "router top-k weights scores")?;
    let ids = contiguous::<u32>(si, li, "router top-k weights ids")?;
    // SAFETY: uninitialised, but the launch writes probs[n, k] and weights[n, k] for every n < N
    // and k < K (thread n of the grid-strided loop); N · K = 0: never read.
    let mut out = unsafe { dev.alloc::<f32>((2 * n * k).max(1))? };
    if n * k > 0 {
        let (n32, e32, k32) = (u32_of(n, "router top-k weights tokens")?, u32_of(e, "router top-k weights experts")?, u32_of(k, "router top-k weights K")?);
        u32_of(2 * n * k, "router top-k weights outputs")?;
        let (has_scale, c) = match scale {
            Some(c) => (1u32, c),
            None => (0u32, 1.0f32),
        };
        let f = route_func(&dev, "route_topk_weights")?;
        let mut b = f.builder();
        b.arg(&scores).arg(&ids).arg(&n32).arg(&e32).arg(&k32).arg(&renorm).arg(&eps).arg(&has_scale).arg(&c).arg(&mut out);
        // SAFETY: the arguments are those of `route_topk_weights(scores_NE, ids_NK, N, E, K,
        // renorm, eps, has_scale, scale, out)` in order: scores and ids are the contiguous [N, E]
        // f32 and [N, K] u32 inputs (shapes and dtypes checked above), out holds 2 · N · K. The
        // kernel reads rows n < N only and reads scores_NE[n, id] only for id < E.
        unsafe { b.launch(grid(n)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, n, k))))
}

/// token_A [N · K] u32 = a / K on `dev` (`fused::token_map`).
pub(crate) fn token_map(dev: &CudaDevice, n: usize, k: usize) -> Result<(CudaStorage, Shape)> {
    let a = n * k;
    // SAFETY: uninitialised, but the launch writes token_A[a] for every a < A (grid-strided);
    // A = 0: never read.
    let mut out = unsafe { dev.alloc::<u32>(a.max(1))? };
    if a > 0 {
        let (a32, k32) = (u32_of(a, "router token map assignments")?, u32_of(k, "router token map K")?);
        let f = route_func(dev, "route_token_map")?;
        let mut b = f.builder();
        b.arg(&a32).arg(&k32).arg(&mut out);
        // SAFETY: the arguments are those of `route_token_map(A, K, token_A)` in order; out holds
        // A entries and the kernel writes a < A only; K > 0 as A = N · K > 0 (no division by 0).
        unsafe { b.launch(grid(a)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(a)))
}
