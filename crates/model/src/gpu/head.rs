//! Launch of `head.cu`: the LM head's log-probability / entropy surrogate and its gradient on
//! the device (`crate::head_grad` defines both and checks the inputs). One block per row of
//! logits, so a chunk of C rows costs one launch and reads its logits once (the value) or twice
//! (the gradient, which also writes dz once).
//!
//! Legend: C rows, V vocabulary.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

use super::head_func as func;
use super::ops::contiguous;

/// Threads per block (`HEAD_THREADS` in head.cu, the kernels' launch bound).
const THREADS: u32 = 512;

/// (lp, h, lse) per row [C, 3] f32 of the contiguous logits [C, V] (f32 or bf16) for the [C] u32
/// `target` at 1 / T = `inv_t` (`crate::head_grad::token_stats`).
pub(crate) fn stats(s: &CudaStorage, l: &Layout, target: &Tensor, inv_t: f32) -> Result<(CudaStorage, Shape)> {
    fn go<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout, target: &Tensor, inv_t: f32, name: &'static str) -> Result<(CudaStorage, Shape)> {
        let (c, v) = l.shape().dims2()?;
        if v == 0 || v > u32::MAX as usize || c > i32::MAX as usize {
            candle_core::bail!("token stats: logits [{c}, {v}] (1 <= V < 2^32, C < 2^31)");
        }
        let dev = s.device().clone();
        let z = contiguous::<T>(s, l, "token stats logits")?;
        let tg = target.storage_and_layout();
        let t = terms_view::<u32>(&tg.0, tg.1, c, "target_C")?;
        // SAFETY: uninitialised, but the launch writes out[3 row .. 3 row + 3] for every row < C
        // (thread 0 of each of the C blocks); C = 0: never read.
        let mut out = unsafe { dev.alloc::<f32>((3 * c).max(1))? };
        if c > 0 {
            let v32 = v as u32;
            let f = func(&dev, name)?;
            let mut b = f.builder();
            b.arg(&z).arg(&v32).arg(&t).arg(&inv_t).arg(&mut out);
            let cfg = LaunchConfig { grid_dim: (c as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments are those of `head_stats_{f32,bf16}(logits, V, target, inv_t,
            // out)` (head.cu) in order, `T` the kernel's element type: z is the contiguous [C, V]
            // logits, target holds C u32 (checked by `terms_view`), out 3 · C f32. One block per row
            // (C < 2^31), THREADS threads (the launch bound and its shared arrays' size); it reads
            // z[row · V + j] for j < V only (a target id >= V is not read: NaN).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((c, 3))))
    }
    match s.dtype() {
        DType::F32 => go::<f32>(s, l, target, inv_t, "head_stats_f32"),
        DType::BF16 => go::<bf16>(s, l, target, inv_t, "head_stats_bf16"),
        other => candle_core::bail!("token stats: logits dtype {other:?} (f32 or bf16)"),
    }
}

/// Per row of the value / gradient kernels: the target id, the weights of lp and h (h left out
/// when `g_h` is None) and 1 / T — `crate::head_grad`'s checked inputs, borrowed.
pub(crate) struct Terms<'a> {
    pub target: &'a Tensor,
    pub g_lp: &'a Tensor,
    pub g_h: Option<&'a Tensor>,
    pub inv_t: f32,
}

/// Which kernel: the [C] values or the [C, V] gradient.
#[derive(Clone, Copy)]
enum Kind {
    Value,
    Grad,
}

/// The [C] f32 surrogate values of the contiguous logits [C, V] (f32 or bf16).
pub(crate) fn value(s: &CudaStorage, l: &Layout, terms: &Terms) -> Result<(CudaStorage, Shape)> {
    typed(s, l, terms, Kind::Value)
}

/// d(Σ values)/d logits [C, V] in the logits' dtype.
pub(crate) fn grad(s: &CudaStorage, l: &Layout, terms: &Terms) -> Result<(CudaStorage, Shape)> {
    typed(s, l, terms, Kind::Grad)
}

fn typed(s: &CudaStorage, l: &Layout, terms: &Terms, kind: Kind) -> Result<(CudaStorage, Shape)> {
    match s.dtype() {
        DType::F32 => launch::<f32>(s, l, terms, kind, false),
        DType::BF16 => launch::<bf16>(s, l, terms, kind, true),
        other => candle_core::bail!("head surrogate: logits dtype {other:?} (f32 or bf16)"),
    }
}

/// A contiguous CUDA view of a [C] tensor of the op (`what` names it in errors).
fn terms_view<'a, T: CudaDType>(st: &'a Storage, l: &Layout, c: usize, what: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(cs) = st else { candle_core::bail!("head surrogate: {what} is not on the CUDA device") };
    let v = contiguous::<T>(cs, l, what)?;
    if v.len() != c {
        candle_core::bail!("head surrogate: {what} holds {} values for {c} rows", v.len());
    }
    Ok(v)
}

fn launch<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout, terms: &Terms, kind: Kind, bf: bool) -> Result<(CudaStorage, Shape)> {
    let (c, v) = l.shape().dims2()?;
    if v == 0 || v > u32::MAX as usize || c > i32::MAX as usize {
        candle_core::bail!("head surrogate: logits [{c}, {v}] (1 <= V < 2^32, C < 2^31)");
    }
    let dev = s.device().clone();
    let z = contiguous::<T>(s, l, "head surrogate logits")?;
    let tg = terms.target.storage_and_layout();
    let gl = terms.g_lp.storage_and_layout();
    let gh = terms.g_h.map(Tensor::storage_and_layout);
    let target = terms_view::<u32>(&tg.0, tg.1, c, "target_C")?;
    let g_lp = terms_view::<f32>(&gl.0, gl.1, c, "g_lp_C")?;
    let g_h = match &gh {
        Some((st, lay)) => Some(terms_view::<f32>(st, lay, c, "g_h_C")?),
        None => None,
    };
    let null = 0u64;
    let v32 = v as u32;
    let cfg = LaunchConfig { grid_dim: (c as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    match kind {
        Kind::Value => {
            // SAFETY: uninitialised, but the launch writes out[row] for every row < C (thread 0
            // of each of the C blocks); C = 0: never read.
            let mut out = unsafe { dev.alloc::<f32>(c.max(1))? };
            if c > 0 {
                let f = func(&dev, if bf { "head_value_bf16" } else { "head_value_f32" })?;
                let mut b = f.builder();
                b.arg(&z).arg(&v32).arg(&target).arg(&g_lp);
                match &g_h {
                    Some(g) => b.arg(g),
                    None => b.arg(&null),
                };
                b.arg(&terms.inv_t).arg(&mut out);
                // SAFETY: the arguments are those of `head_value_{f32,bf16}(logits, V, target,
                // g_lp, g_h, inv_t, out)` (head.cu) in order, `T` the kernel's element type: z is
                // the contiguous [C, V] logits (dtype matched above), target (u32), g_lp and g_h
                // (f32) hold C values each (checked by `terms_view`), `null` (a 0u64,
                // pointer-sized) the null g_h the kernel tests for, out C. One block per row (C <
                // 2^31), THREADS threads: the kernel's launch bound and the size of its shared
                // arrays; it reads z[row · V + j] for j < V only (a target id >= V is not read).
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(c)))
        }
        Kind::Grad => {
            // SAFETY: uninitialised, but the launch writes dz[row, j] for every row < C and j < V
            // (block row, block-strided threads over j); C = 0: never read.
            let mut out = unsafe { dev.alloc::<T>((c * v).max(1))? };
            if c > 0 {
                let f = func(&dev, if bf { "head_grad_bf16" } else { "head_grad_f32" })?;
                let mut b = f.builder();
                b.arg(&z).arg(&v32).arg(&target).arg(&g_lp);
                match &g_h {
                    Some(g) => b.arg(g),
                    None => b.arg(&null),
                };
                b.arg(&terms.inv_t).arg(&mut out);
                // SAFETY: the arguments are those of `head_grad_{f32,bf16}(logits, V, target, g_lp,
                // g_h, inv_t, dz)` (head.cu) in order, `T` the kernel's element type for logits
                // and dz: z is the contiguous [C, V] logits, dz a fresh C · V buffer, target (u32),
                // g_lp and g_h (f32) hold C values each (checked by `terms_view`), `null` the null
                // g_h. One block per row (C < 2^31), THREADS threads (the launch bound and the
                // shared arrays' size); it touches z and dz at row · V + j for j < V only.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((c, v))))
        }
    }
}
