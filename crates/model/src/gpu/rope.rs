//! Launch of `rope.cu`: the rotary embedding in one kernel (the CUDA side of `crate::nn::rope`),
//! and the engine's fused QK-norm + rotary + KV-pool write (`crate::nn::paged_qk`).
//!
//! Legend: B rows, n heads, T slots, Dh head dim, R rotary dim.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
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

/// The pools and slots of [`qk_norm_rope_write`]: the layer's key and value pools [R, G, Dh]
/// (contiguous from offset 0; written in place) and one u32 pool row a new token.
pub(crate) struct PagedWrite<'a> {
    pub k_pool: (&'a CudaStorage, &'a Layout),
    pub v_pool: (&'a CudaStorage, &'a Layout),
    pub slots: Arg<'a>,
}

/// The engine's q / k step of a paged forward in one launch (`qk_norm_rope_write_bf16_<Dh>`):
/// q [N, H, Dh], k and v [N, G, Dh] (bf16, the projections), QK-norm weights `qw`, `kw` [Dh] with
/// their eps, the rotary tables cos / sin [1, 1, N, Dh] (the full head width rotates); writes
/// k's normalised, rotated rows and v's rows into the pools at the slots and returns q's
/// normalised, rotated rows [N, H, Dh] — the bits of `rms_norm`, `rope` (token-major) and
/// `kv_write` one after another. Dh is 128. The caller owns the pools exclusively for the
/// launch (`KvPool` is borrowed mutably by the forward) and has checked every slot against them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_norm_rope_write(q: Arg, k: Arg, v: Arg, (qw, kw): (Arg, Arg), eps: (f32, f32), (cs, sn): (Arg, Arg), out: PagedWrite, (n, h, g, dh): (usize, usize, usize, usize)) -> Result<CudaStorage> {
    let name = match dh {
        128 => "qk_norm_rope_write_bf16_128",
        _ => candle_core::bail!("paged q/k: head dim {dh} (128)"),
    };
    let all = [q.0, k.0, v.0, qw.0, kw.0, cs.0, sn.0, out.k_pool.0, out.v_pool.0];
    if all.iter().any(|s| s.dtype() != DType::BF16) || out.slots.0.dtype() != DType::U32 {
        candle_core::bail!("paged q/k: bf16 rows, weights, tables and pools, u32 slots");
    }
    let want = |l: &Layout, dims: &[usize], what: &str| -> Result<()> {
        if l.dims() != dims {
            candle_core::bail!("paged q/k: {what} {:?}, expected {dims:?}", l.dims());
        }
        Ok(())
    };
    want(q.1, &[n, h, dh], "q")?;
    want(k.1, &[n, g, dh], "k")?;
    want(v.1, &[n, g, dh], "v")?;
    want(qw.1, &[dh], "q norm weight")?;
    want(kw.1, &[dh], "k norm weight")?;
    want(cs.1, &[1, 1, n, dh], "cos")?;
    want(sn.1, &[1, 1, n, dh], "sin")?;
    want(out.slots.1, &[n], "slots")?;
    for (what, (_, l)) in [("key pool", out.k_pool), ("value pool", out.v_pool)] {
        if l.start_offset() != 0 || !l.is_contiguous() || l.dims().len() != 3 || l.dims()[1..] != [g, dh] {
            candle_core::bail!("paged q/k: the {what} {:?} must be a contiguous [R, {g}, {dh}] from offset 0", l.dims());
        }
    }
    let dev = q.0.device().clone();
    fn x<'a>(a: Arg<'a>, what: &str) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, bf16>> {
        contiguous::<bf16>(a.0, a.1, what)
    }
    let (qv, kv, vv) = (x(q, "paged q")?, x(k, "paged k")?, x(v, "paged v")?);
    let (qwv, kwv, cv, sv) = (x(qw, "q norm weight")?, x(kw, "k norm weight")?, x(cs, "cos")?, x(sn, "sin")?);
    let slots = contiguous::<u32>(out.slots.0, out.slots.1, "paged slots")?;
    let stream = dev.cuda_stream();
    let (kp, _gk) = out.k_pool.0.as_cuda_slice::<bf16>()?.device_ptr(&stream);
    let (vp, _gv) = out.v_pool.0.as_cuda_slice::<bf16>()?.device_ptr(&stream);
    // SAFETY: uninitialised, but the launch writes every element of q's N · H · Dh rows (a warp
    // a row, all Dh lanes); N · H · Dh = 0 returns a never-read buffer.
    let mut q_out = unsafe { dev.alloc::<bf16>((n * h * dh).max(1))? };
    let rows = n * (h + 2 * g);
    if rows > 0 {
        let u32_of = |v: usize, what: &str| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("paged q/k: {what} = {v} exceeds u32")));
        let (n32, h32, g32) = (u32_of(n, "tokens")?, u32_of(h, "heads")?, u32_of(g, "kv heads")?);
        let f = rope_func(&dev, name)?;
        let mut b = f.builder();
        b.arg(&qv).arg(&kv).arg(&vv).arg(&qwv).arg(&kwv).arg(&eps.0).arg(&eps.1).arg(&cv).arg(&sv).arg(&mut q_out).arg(&kp).arg(&vp).arg(&slots).arg(&n32).arg(&h32).arg(&g32);
        let blocks = rows.div_ceil(4).min(2048) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `qk_norm_rope_write_bf16_<Dh>(q, k, v, qw, kw, q_eps,
        // k_eps, cos, sin, q_out, k_pool, v_pool, slot, N, H, G)` in order, all bf16 but the u32
        // slots (checked): q, k, v, the weights and tables contiguous with the shapes checked
        // above, q_out holds N · H · Dh. The pools are contiguous [R, G, Dh] from offset 0 and
        // every slot is below R (the caller's check), so each warp writes the Dh values of one
        // pool row inside them; the pools' device pointers come from their storage, which the
        // caller holds exclusively for the forward (no other reader or writer on any thread; the
        // attention reading them next is ordered after this launch on the same stream). Warps
        // stride over the N (H + 2G) rows of 128-thread blocks (the launch bound).
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(q_out, dev))
}
