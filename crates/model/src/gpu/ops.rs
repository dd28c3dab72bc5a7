//! The CUDA MoE stages as candle custom ops, each with its backward:
//!
//! | op | forward | backward |
//! |---|---|---|
//! | `ExpertMlp` | (x_ND, W_gu [E,2F,D], W_d [E,D,F]) → y_RD: dispatch (permute rows into expert order), gate_up GEMM, SwiGLU, down GEMM | `MlpBwd` stages: dgu (dy·W_d, SwiGLU backward), dW_d = dyᵀ·a, dx (dgu·W_gu, summed back per token), dW_gu = dguᵀ·xp |
//! | `Combine`   | (y_RD, w_A) → out_ND = Σ_a w_a · y[pos(a)] | dy (`CombineBwd`), dw (`CombineBwd`) |
//! | `Gather`    | x_ND → xp_RD, the dispatch permute alone (expert parallelism, sender side) | per-token sum (`GatherBwd`) |
//! | `Unpermute` | y_RD → y_AD = y[pos(a)] (expert parallelism, receiver side) | the permute (`Gather`) |
//!
//! Under an identity plan (`Plan::sorted_rows`: the rows already in expert order) `ExpertMlp`
//! reads x as xp and returns dx unsummed. It keeps its activations (xp, gu, a) for the backward
//! and runs the whole expert MLP in one op, so candle's gradient store only sees its inputs (each
//! gradient candle accumulates costs a zero fill and an add of the full tensor).
//!
//! Legend: N tokens, D hidden, F expert intermediate, E experts, A assignments, R rows.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::gemm::{self, Product};
use super::plan::Plan;
use super::func;

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name}: CUDA only (the CPU path is crates/model/src/moe)")
}

pub(super) fn contiguous<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((o1, o2)) => Ok(s.as_cuda_slice::<T>()?.slice(o1..o2)),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

pub(super) fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{what}: dtype {other:?} not supported on the CUDA MoE path (f32, bf16)"),
    }
}

/// Dispatch `$body` over the storage dtype (f32 / bf16) with `$T` bound (`suffix`'s refusal).
macro_rules! typed {
    ($dtype:expr, $what:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            other => candle_core::bail!("{}: dtype {other:?} not supported on the CUDA MoE path (f32, bf16)", $what),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// kernel launches on typed device buffers

/// xp[pos(a)] = x[token(a)] → [R, D] (padded rows zero).
fn permute<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    p: &Plan,
    x: &CudaView<T>,
    d: usize,
    suf: &str,
) -> Result<CudaSlice<T>> {
    let rows = p.layout.rows;
    // SAFETY: `alloc` leaves memory uninitialised; it is only taken in the compact layout, where
    // `pos_A` maps the A assignments one to one onto the R = A rows (a stable counting sort by
    // expert, or `Plan::sorted_rows`' expert-major order), so the launch below writes every row
    // before anything reads it (A = 0: R = 0, and the 1-element buffer is never read).
    let mut xp = if p.layout.padded.is_some() { p.dev.alloc_zeros::<T>((rows * d).max(1))? } else { unsafe { p.dev.alloc::<T>((rows * d).max(1))? } };
    if p.num_assignments > 0 {
        let f = func(&p.dev, &format!("moe_permute_{suf}"))?;
        let (a32, d32) = (p.num_assignments as u32, d as u32);
        let mut b = f.builder();
        b.arg(x).arg(&p.token_A).arg(&p.pos_A).arg(&a32).arg(&d32).arg(&mut xp);
        let cfg = LaunchConfig { grid_dim: (p.num_assignments.clamp(1, 1 << 16) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are those of `moe_permute_{f32,bf16}(x, token_A, pos_A, A, D, xp)`
        // (kernels.cu) in order, `T` the kernel's element type. Every access is in bounds: x is
        // the contiguous [N, D] input (the ops check N = num_tokens and D before calling),
        // `Plan::build` rejected token ids >= N, pos_A[a] < R (its expert's first row + its rank
        // among the expert's rows), and xp holds R · D. The kernel strides over the grid and the
        // block, so any grid / block size is valid; it checks alignment before its 16-byte copies.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(xp)
}

fn gather_sum<T: CudaDType + DeviceRepr>(
    p: &Plan,
    y: &CudaView<T>,
    w: Option<&CudaView<f32>>,
    d: usize,
    suf: &str,
) -> Result<CudaSlice<T>> {
    let n = p.num_tokens;
    // SAFETY: uninitialised, but the launch below writes out[n, d] for every token n < N and
    // d < D (a grid-strided block per token, a block-strided thread per column); N = 0 returns
    // the 1-element buffer of a zero-size tensor, never read.
    let mut out = unsafe { p.dev.alloc::<T>((n * d).max(1))? };
    if n == 0 {
        return Ok(out);
    }
    let f = func(&p.dev, &format!("moe_gather_sum_{suf}"))?;
    let (n32, d32) = (n as u32, d as u32);
    let null = 0u64;
    let mut b = f.builder();
    b.arg(y);
    match w {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    b.arg(&p.toff).arg(&p.list).arg(&p.pos_A).arg(&n32).arg(&d32).arg(&mut out);
    let cfg = LaunchConfig { grid_dim: (n.clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are those of `moe_gather_sum_{f32,bf16}(y, w_A, toff, list, pos_A, N,
    // D, out)` in order; `null` (a 0u64, pointer-sized) is the null w_A the kernel tests for. y
    // holds R · D (`Combine`, `GatherBwd`, `Unpermute` check R = layout.rows; `Stage::Dx` passes
    // the [R, D] product), w the A f32 weights (`Combine` checks), toff N + 1 and list A entries;
    // list holds assignments < A, pos_A[a] < R, and out holds N · D.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// SwiGLU kernels: a thread per two adjacent columns, a grid row per row (strided past 65535).
fn rows_cfg(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (cols.div_ceil(512).max(1) as u32, rows.clamp(1, 65535) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// silu(gate) · up of gu [R, 2F] → [R, F].
pub(super) fn swiglu<T: CudaDType + DeviceRepr>(dev: &CudaDevice, gu: &CudaView<T>, r: usize, f: usize, suf: &str) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised, but the launch writes every out[r, j]: `rows_cfg` gives
    // ceil(F / 512) blocks of 256 threads, two columns a thread, over the F columns, and a
    // grid-strided y over the R rows; when R · F = 0 the buffer is never read.
    let mut out = unsafe { dev.alloc::<T>((r * f).max(1))? };
    if r * f > 0 {
        let func = func(dev, &format!("moe_swiglu_{suf}"))?;
        let (r32, f32_) = (r as u32, f as u32);
        let mut b = func.builder();
        b.arg(gu).arg(&r32).arg(&f32_).arg(&mut out);
        // SAFETY: the arguments are those of `moe_swiglu_{f32,bf16}(gu, R, F, out)` in order. gu is
        // the fresh [R, 2F] gate_up product (`gemm` Nt with ndim = 2F, offset 0) and out holds
        // R · F: the kernel reads gu[r, f] and gu[r, F + f], writes out[r, f], for r < R, f < F.
        // Its paired (8 / 4-byte) accesses run only for even F, which keeps them aligned.
        unsafe { b.launch(rows_cfg(r, f)) }.w()?;
    }
    Ok(out)
}

/// (gu [R, 2F], da [R, F]) → dgu [R, 2F].
pub(super) fn swiglu_bwd<T: CudaDType + DeviceRepr>(dev: &CudaDevice, gu: &CudaView<T>, da: &CudaView<T>, r: usize, f: usize, suf: &str) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised, but the launch writes both halves, dgu[r, j] and dgu[r, F + j], of
    // every row r < R and column j < F (same grid as `swiglu`); R · F = 0: never read.
    let mut out = unsafe { dev.alloc::<T>((r * 2 * f).max(1))? };
    if r * f > 0 {
        let func = func(dev, &format!("moe_swiglu_bwd_{suf}"))?;
        let (r32, f32_) = (r as u32, f as u32);
        let mut b = func.builder();
        b.arg(gu).arg(da).arg(&r32).arg(&f32_).arg(&mut out);
        // SAFETY: the arguments are those of `moe_swiglu_bwd_{f32,bf16}(gu, da, R, F, dgu)` in order.
        // gu is the forward's saved [R, 2F] activation, da the fresh [R, F] product (`gemm` Nn
        // with kdim = F) and out holds R · 2F, as the kernel indexes them; paired accesses only
        // for even F, as in `swiglu`.
        unsafe { b.launch(rows_cfg(r, f)) }.w()?;
    }
    Ok(out)
}

/// One per-expert product (`gemm`) into a new buffer; the weight is [E, ndim, kdim].
fn gemm<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    p: &Plan,
    product: Product,
    lhs: &CudaView<T>,
    rhs: &CudaView<T>,
    kdim: usize,
    ndim: usize,
    dtype: DType,
) -> Result<CudaSlice<T>> {
    gemm_on(&p.dev, p.imp, &p.layout, product, lhs, rhs, kdim, ndim, dtype)
}

/// [`gemm`] over any row layout (the invariant grouped product's backward has no plan, only
/// its counts: `gpu::grouped_bwd`).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_on<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    imp: super::GemmImpl,
    layout: &super::plan::RowLayout,
    product: Product,
    lhs: &CudaView<T>,
    rhs: &CudaView<T>,
    kdim: usize,
    ndim: usize,
    dtype: DType,
) -> Result<CudaSlice<T>> {
    let rows = layout.rows;
    let e = layout.counts.len();
    let n_out = match product {
        Product::Nt => rows * ndim,
        Product::Nn => rows * kdim,
        Product::Tn => e * ndim * kdim,
    };
    // Tn skips experts without rows: their gradient must read zero
    // SAFETY: uninitialised only for Nt and Nn, whose GEMMs (beta = 0: C is written, not read)
    // cover every row: in the compact layout each expert's rows offsets[e]..offsets[e] + counts[e]
    // (together all R), in the padded layout all E · padded rows (one strided-batched call).
    let mut out = if product == Product::Tn { dev.alloc_zeros::<T>(n_out.max(1))? } else { unsafe { dev.alloc::<T>(n_out.max(1))? } };
    let stream = dev.cuda_stream();
    {
        let (lp, _g1) = lhs.device_ptr(&stream);
        let (rp, _g2) = rhs.device_ptr(&stream);
        let (op, _g3) = out.device_ptr_mut(&stream);
        // SAFETY: `run`'s contract: lp, rp, op are device addresses on `dev`'s stream (which the
        // cuBLAS handle uses), their buffers borrowed and their guards held across the call, and
        // of the sizes the product reads and writes: out holds n_out as sized above; lhs is
        // [R, kdim] (Nt) or [R, ndim] (Nn, Tn), rhs the [E, ndim, kdim] weight (Nt, Nn) or the
        // [R, kdim] activations (Tn). `ExpertMlp::cuda_fwd` checks the forward's dims; the
        // backward stages (`MlpBwd`, private, built only by `ExpertMlp::bwd`) get the gradient of
        // y [R, D], the forward's weights and saved activations, and dgu [R, 2F] from `Stage::Dgu`;
        // `grouped_bwd::GroupedGrad::cuda_fwd` checks dy [R, N] and W [E, N, K] / x [R, K].
        unsafe { gemm::run(dev, imp, layout, product, dtype, kdim, ndim, lp, rp, op)? };
    }
    Ok(out)
}

fn storage<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage) -> Result<CudaView<'a, T>> {
    let sl = s.as_cuda_slice::<T>()?;
    Ok(sl.slice(0..sl.len()))
}

// ---------------------------------------------------------------------------------------------

/// Activations the backward needs: xp [R, D] (none under an identity plan: x is xp), gu
/// [R, 2F], a [R, F].
struct Saved {
    xp: Option<CudaStorage>,
    gu: CudaStorage,
    a: CudaStorage,
    d: usize,
    f: usize,
}

/// (x_ND, gate_up [E, 2F, D], down [E, D, F]) → y_RD, every row one assignment's expert output.
pub(crate) struct ExpertMlp {
    pub(crate) plan: Arc<Plan>,
    saved: Mutex<Option<Arc<Saved>>>,
}

impl ExpertMlp {
    pub(crate) fn new(plan: Arc<Plan>) -> Self {
        Self { plan, saved: Mutex::new(None) }
    }
}

impl CustomOp3 for ExpertMlp {
    fn name(&self) -> &'static str {
        "moe-expert-mlp"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, sx: &CudaStorage, lx: &Layout, sg: &CudaStorage, lg: &Layout, sd: &CudaStorage, ld: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.plan;
        let (n, d) = lx.shape().dims2()?;
        let (e, f2, d2) = lg.shape().dims3()?;
        let (e2, d3, f) = ld.shape().dims3()?;
        if n != p.num_tokens || e != p.layout.counts.len() || e2 != e || d2 != d || d3 != d || f2 != 2 * f {
            candle_core::bail!(
                "moe-expert-mlp: x {:?}, gate_up {:?}, down {:?} do not fit {} tokens / {} experts",
                lx.dims(), lg.dims(), ld.dims(), p.num_tokens, p.layout.counts.len()
            );
        }
        let dtype = sx.dtype();
        if sg.dtype() != dtype || sd.dtype() != dtype {
            candle_core::bail!("moe-expert-mlp: x {dtype:?}, gate_up {:?}, down {:?} must share a dtype", sg.dtype(), sd.dtype());
        }
        let suf = suffix(dtype, self.name())?;
        let r = p.layout.rows;
        typed!(dtype, self.name(), T => {
            let x = contiguous::<T>(sx, lx, self.name())?;
            let wg = contiguous::<T>(sg, lg, self.name())?;
            let wd = contiguous::<T>(sd, ld, self.name())?;
            let xp = if p.identity { None } else { Some(permute::<T>(p, &x, d, suf)?) };
            let gu = match &xp {
                Some(xp) => gemm::<T>(p, Product::Nt, &xp.slice(..), &wg, d, 2 * f, dtype)?,
                None => gemm::<T>(p, Product::Nt, &x, &wg, d, 2 * f, dtype)?,
            };
            let a = swiglu::<T>(&p.dev, &gu.slice(..), r, f, suf)?;
            let y = gemm::<T>(p, Product::Nt, &a.slice(..), &wd, f, d, dtype)?;
            let xp = xp.map(|xp| storage(xp, &p.dev));
            *self.saved.lock().unwrap() = Some(Arc::new(Saved { xp, gu: storage(gu, &p.dev), a: storage(a, &p.dev), d, f }));
            Ok((storage(y, &p.dev), Shape::from((r, d))))
        })
    }
    fn bwd(&self, x: &Tensor, gate_up: &Tensor, down: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap().clone();
        let Some(saved) = saved else { candle_core::bail!("moe-expert-mlp: backward without a forward") };
        let stage = |s: Stage| MlpBwd { plan: self.plan.clone(), saved: saved.clone(), stage: s };
        let dy = grad.contiguous()?;
        let dgu = dy.apply_op2_no_bwd(down, &stage(Stage::Dgu))?;
        let ddown = dy.apply_op1_no_bwd(&stage(Stage::Ddown))?;
        drop(dy);
        let dx = dgu.apply_op2_no_bwd(gate_up, &stage(Stage::Dx))?;
        let dgate_up = match saved.xp {
            Some(_) => dgu.apply_op1_no_bwd(&stage(Stage::DgateUp))?,
            None => dgu.apply_op2_no_bwd(&x.contiguous()?, &stage(Stage::DgateUpFromX))?,
        };
        Ok((Some(dx), Some(dgate_up), Some(ddown)))
    }
}

#[derive(Clone, Copy)]
enum Stage {
    /// (dy, down) → dgu = SwiGLU'(gu) ⊙ (dy · W_d)
    Dgu,
    /// dy → dW_d = dyᵀ · a
    Ddown,
    /// (dgu, gate_up) → dx = Σ_rows-of-token (dgu · W_gu)
    Dx,
    /// dgu → dW_gu = dguᵀ · xp
    DgateUp,
    /// (dgu, x) → dW_gu = dguᵀ · x (identity plan: x is xp)
    DgateUpFromX,
}

struct MlpBwd {
    plan: Arc<Plan>,
    saved: Arc<Saved>,
    stage: Stage,
}

const NAME_BWD: &str = "moe-expert-mlp-bwd";

impl CustomOp1 for MlpBwd {
    fn name(&self) -> &'static str {
        NAME_BWD
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(NAME_BWD)
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (p, sv) = (&self.plan, &self.saved);
        let e = p.layout.counts.len();
        let dtype = s.dtype();
        typed!(dtype, NAME_BWD, T => {
            let g = contiguous::<T>(s, l, NAME_BWD)?;
            let (out, shape) = match self.stage {
                Stage::Ddown => (gemm::<T>(p, Product::Tn, &g, &view::<T>(&sv.a)?, sv.f, sv.d, dtype)?, Shape::from((e, sv.d, sv.f))),
                Stage::DgateUp => {
                    let Some(xp) = &sv.xp else { candle_core::bail!("moe-expert-mlp-bwd: no saved xp") };
                    (gemm::<T>(p, Product::Tn, &g, &view::<T>(xp)?, sv.d, 2 * sv.f, dtype)?, Shape::from((e, 2 * sv.f, sv.d)))
                }
                _ => candle_core::bail!("moe-expert-mlp-bwd: stage takes two inputs"),
            };
            Ok((storage(out, &p.dev), shape))
        })
    }
}

impl CustomOp2 for MlpBwd {
    fn name(&self) -> &'static str {
        NAME_BWD
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(NAME_BWD)
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (p, sv) = (&self.plan, &self.saved);
        let dtype = s1.dtype();
        let suf = suffix(dtype, NAME_BWD)?;
        let r = p.layout.rows;
        typed!(dtype, NAME_BWD, T => {
            let g = contiguous::<T>(s1, l1, NAME_BWD)?;
            let w = contiguous::<T>(s2, l2, NAME_BWD)?;
            match self.stage {
                Stage::Dgu => {
                    let da = gemm::<T>(p, Product::Nn, &g, &w, sv.f, sv.d, dtype)?;
                    let dgu = swiglu_bwd::<T>(&p.dev, &view::<T>(&sv.gu)?, &da.slice(..), r, sv.f, suf)?;
                    Ok((storage(dgu, &p.dev), Shape::from((r, 2 * sv.f))))
                }
                Stage::Dx => {
                    let dxp = gemm::<T>(p, Product::Nn, &g, &w, sv.d, 2 * sv.f, dtype)?;
                    let dx = if p.identity { dxp } else { gather_sum::<T>(p, &dxp.slice(..), None, sv.d, suf)? };
                    Ok((storage(dx, &p.dev), Shape::from((p.num_tokens, sv.d))))
                }
                Stage::DgateUpFromX => {
                    let e = p.layout.counts.len();
                    Ok((storage(gemm::<T>(p, Product::Tn, &g, &w, sv.d, 2 * sv.f, dtype)?, &p.dev), Shape::from((e, 2 * sv.f, sv.d))))
                }
                _ => candle_core::bail!("moe-expert-mlp-bwd: stage takes one input"),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// (y_RD, w_A f32) → out_ND = Σ_a w_a · y[pos(a)].
pub(crate) struct Combine(pub(crate) Arc<Plan>);

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "moe-combine"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let (r, d) = l1.shape().dims2()?;
        if r != p.layout.rows || l2.shape().elem_count() != p.num_assignments || s2.dtype() != DType::F32 {
            candle_core::bail!("moe-combine: y {:?} ({} rows planned), w {:?} {:?} (want [{}] f32)", l1.dims(), p.layout.rows, l2.dims(), s2.dtype(), p.num_assignments);
        }
        let suf = suffix(s1.dtype(), self.name())?;
        let w = contiguous::<f32>(s2, l2, self.name())?;
        typed!(s1.dtype(), self.name(), T => {
            let y = contiguous::<T>(s1, l1, self.name())?;
            let out = gather_sum::<T>(p, &y, Some(&w), d, suf)?;
            Ok((CudaStorage::wrap_cuda_slice(out, p.dev.clone()), Shape::from((p.num_tokens, d))))
        })
    }
    fn bwd(&self, y: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dy = grad.apply_op2_no_bwd(w, &CombineBwd { plan: self.0.clone(), want_dw: false })?;
        let dw = grad.apply_op2_no_bwd(y, &CombineBwd { plan: self.0.clone(), want_dw: true })?;
        Ok((Some(dy), Some(dw.reshape(w.shape())?)))
    }
}

/// Combine backward: (dout_ND, w_A) → dy_RD, or (dout_ND, y_RD) → dw_A (f32).
pub(crate) struct CombineBwd {
    pub(crate) plan: Arc<Plan>,
    pub(crate) want_dw: bool,
}

impl CustomOp2 for CombineBwd {
    fn name(&self) -> &'static str {
        "moe-combine-bwd"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.plan;
        let (n, d) = l1.shape().dims2()?;
        if n != p.num_tokens {
            candle_core::bail!("moe-combine-bwd: {n} gradient rows, {} tokens planned", p.num_tokens);
        }
        let suf = suffix(s1.dtype(), self.name())?;
        let (a, rows) = (p.num_assignments, p.layout.rows);
        typed!(s1.dtype(), self.name(), T => {
            let dout = contiguous::<T>(s1, l1, self.name())?;
            let null = 0u64;
            let (a32, d32) = (a as u32, d as u32);
            let f = func(&p.dev, &format!("moe_combine_bwd_{suf}"))?;
            let cfg = LaunchConfig { grid_dim: (a.clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            if self.want_dw {
                // (dout, y) → dw
                let y = contiguous::<T>(s2, l2, self.name())?;
                // SAFETY: uninitialised, but the launch writes dw[a] for every a < A (thread 0 of
                // the block that takes assignment a); A = 0: never read.
                let mut dw = unsafe { p.dev.alloc::<f32>(a.max(1))? };
                if a > 0 {
                    let mut b = f.builder();
                    b.arg(&dout).arg(&y).arg(&null).arg(&p.token_A).arg(&p.pos_A).arg(&a32).arg(&d32).arg(&null).arg(&mut dw);
                    // SAFETY: the arguments are those of `moe_combine_bwd_{f32,bf16}(dout, y, w_A,
                    // token_A, pos_A, A, D, dy, dw_A)` in order, w_A and dy null (0u64), so only
                    // the dw branch runs and w_A is never read. dout is [N, D] (N checked above),
                    // token_A[a] < N, pos_A[a] < R, dw holds A. y must be [R, D]: it is not
                    // re-checked here; `Combine::bwd`, which builds this op, passes Combine's own
                    // input, checked in `Combine::cuda_fwd`. 256 threads is a power of two <= 1024,
                    // as the kernel's 1024-float reduction needs.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok((CudaStorage::wrap_cuda_slice(dw, p.dev.clone()), Shape::from(a)))
            } else {
                // (dout, w) → dy; rows no assignment owns (padding) stay zero
                let w = contiguous::<f32>(s2, l2, self.name())?;
                // SAFETY: uninitialised only in the compact layout, where pos_A maps the A
                // assignments one to one onto the R = A rows, so the launch writes every row.
                let mut dy = if p.layout.padded.is_some() { p.dev.alloc_zeros::<T>((rows * d).max(1))? } else { unsafe { p.dev.alloc::<T>((rows * d).max(1))? } };
                if a > 0 {
                    let mut b = f.builder();
                    b.arg(&dout).arg(&null).arg(&w).arg(&p.token_A).arg(&p.pos_A).arg(&a32).arg(&d32).arg(&mut dy).arg(&null);
                    // SAFETY: the same kernel with y and dw_A null, so only the dy branch runs and
                    // y is never read: it reads dout [N, D] at token_A[a] < N and w_A[a] (f32, the
                    // dtype checked by `contiguous`; A entries, Combine's input checked in
                    // `Combine::cuda_fwd`, not re-checked here) and writes dy [R, D] at pos_A[a] < R.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok((CudaStorage::wrap_cuda_slice(dy, p.dev.clone()), Shape::from((rows, d))))
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// x_ND → xp_RD: every assignment's token row, placed at its row of the plan (the dispatch
/// permute on its own, for expert parallelism: the plan's groups are then the experts of every
/// rank).
/// Backward: dx[n] = Σ over token n's assignments (ascending) of dxp[pos[a]].
pub(crate) struct Gather(pub(crate) Arc<Plan>);

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "moe-gather"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let (n, d) = l.shape().dims2()?;
        if n != p.num_tokens {
            candle_core::bail!("moe-gather: {n} rows, {} tokens planned", p.num_tokens);
        }
        let suf = suffix(s.dtype(), self.name())?;
        typed!(s.dtype(), self.name(), T => {
            let x = contiguous::<T>(s, l, self.name())?;
            let xp = permute::<T>(p, &x, d, suf)?;
            Ok((storage(xp, &p.dev), Shape::from((p.layout.rows, d))))
        })
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&GatherBwd(self.0.clone()))?))
    }
}

/// dxp_RD → dx_ND (the sum of `Gather`'s backward).
pub(crate) struct GatherBwd(pub(crate) Arc<Plan>);

impl CustomOp1 for GatherBwd {
    fn name(&self) -> &'static str {
        "moe-gather-bwd"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let (r, d) = l.shape().dims2()?;
        if r != p.layout.rows {
            candle_core::bail!("moe-gather-bwd: {r} rows, {} planned", p.layout.rows);
        }
        let suf = suffix(s.dtype(), self.name())?;
        typed!(s.dtype(), self.name(), T => {
            let dy = contiguous::<T>(s, l, self.name())?;
            let dx = gather_sum::<T>(p, &dy, None, d, suf)?;
            Ok((storage(dx, &p.dev), Shape::from((p.num_tokens, d))))
        })
    }
}

/// y_RD in the plan's row layout → y_AD, every assignment's row (`out[a] = y[pos[a]]`): the
/// inverse of the dispatch permute for plans whose tokens are the assignments
/// (`Plan::sorted_rows`). Backward: the permute (padding rows zero).
pub(crate) struct Unpermute(pub(crate) Arc<Plan>);

impl CustomOp1 for Unpermute {
    fn name(&self) -> &'static str {
        "moe-unpermute"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let (r, d) = l.shape().dims2()?;
        if r != p.layout.rows || p.num_tokens != p.num_assignments {
            candle_core::bail!("moe-unpermute: {r} rows, {} planned ({} tokens, {} assignments)", p.layout.rows, p.num_tokens, p.num_assignments);
        }
        let suf = suffix(s.dtype(), self.name())?;
        typed!(s.dtype(), self.name(), T => {
            let y = contiguous::<T>(s, l, self.name())?;
            let out = gather_sum::<T>(p, &y, None, d, suf)?;
            Ok((storage(out, &p.dev), Shape::from((p.num_assignments, d))))
        })
    }
    fn bwd(&self, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Gather(self.0.clone()))?))
    }
}
