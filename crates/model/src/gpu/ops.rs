//! The CUDA MoE stages as candle custom ops, each with its backward:
//!
//! | op | forward | backward |
//! |---|---|---|
//! | `Permute`   | x_ND → xp_RD (rows in expert order)          | dx_N = Σ over the token's rows (`Unpermute`) |
//! | `GroupedMm` | (xp_RK, W_ENK) → y_RN = xp · W_eᵀ per expert | dx = dy · W_e, dW_e = dyᵀ · xp (grouped GEMMs) |
//! | `SwiGlu`    | gu_R2F → silu(g) · u                          | `SwiGluBwd` |
//! | `Combine`   | (y_RD, w_A) → out_N = Σ_a w_a · y_pos(a)      | dy (`CombineBwdDy`), dw (`CombineBwdDw`) |
//!
//! Legend: N tokens, D hidden, F expert intermediate, E experts, A assignments, R rows.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::gemm::{self, Product};
use super::plan::Plan;
use super::func;

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name}: CUDA only (the CPU path is crates/model/src/moe)")
}

fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((o1, o2)) => Ok(s.as_cuda_slice::<T>()?.slice(o1..o2)),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{what}: dtype {other:?} not supported on the CUDA MoE path (f32, bf16)"),
    }
}

fn blocks(n: usize, cap: usize) -> u32 {
    n.clamp(1, cap) as u32
}

/// Dispatch `$body` over the storage dtype (f32 / bf16) with `$T` bound.
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

/// x_ND → xp_RD.
pub struct Permute(pub Arc<Plan>);

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "moe-permute"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let (n, d) = l.shape().dims2()?;
        if n != p.num_tokens {
            candle_core::bail!("moe-permute: {n} token rows, the plan has {}", p.num_tokens);
        }
        let rows = p.layout.rows;
        let suf = suffix(s.dtype(), self.name())?;
        typed!(s.dtype(), self.name(), T => {
            let x = contiguous::<T>(s, l, self.name())?;
            // padded rows must read as zeros
            let mut xp = if p.layout.padded.is_some() { p.dev.alloc_zeros::<T>(rows * d)? } else { unsafe { p.dev.alloc::<T>(rows * d)? } };
            if p.num_assignments > 0 {
                let f = func(&p.dev, &format!("moe_permute_{suf}"))?;
                let (a32, d32) = (p.num_assignments as u32, d as u32);
                let mut b = f.builder();
                b.arg(&x).arg(&p.token_A).arg(&p.pos_A).arg(&a32).arg(&d32).arg(&mut xp);
                let cfg = LaunchConfig { grid_dim: (blocks(p.num_assignments, 1 << 16), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(xp, p.dev.clone()), Shape::from((rows, d))))
        })
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&GatherSum(self.0.clone()))?))
    }
}

/// dxp_RD → dx_ND: each token sums its rows (ascending assignment order).
pub struct GatherSum(pub Arc<Plan>);

fn gather_sum<T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    p: &Plan,
    y: &CudaView<T>,
    w: Option<&CudaView<f32>>,
    d: usize,
    suf: &str,
) -> Result<CudaSlice<T>> {
    let n = p.num_tokens;
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
    let cfg = LaunchConfig { grid_dim: (blocks(n, 1 << 16), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

impl CustomOp1 for GatherSum {
    fn name(&self) -> &'static str {
        "moe-gather-sum"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let (_, d) = l.shape().dims2()?;
        let suf = suffix(s.dtype(), self.name())?;
        typed!(s.dtype(), self.name(), T => {
            let y = contiguous::<T>(s, l, self.name())?;
            let out = gather_sum::<T>(p, &y, None, d, suf)?;
            Ok((CudaStorage::wrap_cuda_slice(out, p.dev.clone()), Shape::from((p.num_tokens, d))))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// The per-expert products of `gemm` as an op: `Nt` (forward, with backward), `Nn` and `Tn`
/// (used by the backward).
pub struct GroupedMm {
    pub plan: Arc<Plan>,
    pub product: Product,
}

impl CustomOp2 for GroupedMm {
    fn name(&self) -> &'static str {
        "moe-grouped-mm"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.plan;
        let dtype = s1.dtype();
        if s2.dtype() != dtype {
            candle_core::bail!("moe-grouped-mm: operands {dtype:?} and {:?} differ", s2.dtype());
        }
        let rows = p.layout.rows;
        let e = p.layout.counts.len();
        // (lhs = the row buffer, rhs) and the weight's [N, K]
        let (kdim, ndim, out_shape) = match self.product {
            Product::Nt => {
                let (en, nd, kd) = l2.shape().dims3()?;
                let (r, k) = l1.shape().dims2()?;
                if en != e || r != rows || k != kd {
                    candle_core::bail!("moe-grouped-mm: x {:?} · W {:?}ᵀ for {e} experts, {rows} rows", l1.dims(), l2.dims());
                }
                (kd, nd, Shape::from((rows, nd)))
            }
            Product::Nn => {
                let (en, nd, kd) = l2.shape().dims3()?;
                let (r, n) = l1.shape().dims2()?;
                if en != e || r != rows || n != nd {
                    candle_core::bail!("moe-grouped-mm: dy {:?} · W {:?} for {e} experts, {rows} rows", l1.dims(), l2.dims());
                }
                (kd, nd, Shape::from((rows, kd)))
            }
            Product::Tn => {
                let (r, nd) = l1.shape().dims2()?;
                let (r2, kd) = l2.shape().dims2()?;
                if r != rows || r2 != rows {
                    candle_core::bail!("moe-grouped-mm: dyᵀ {:?} · x {:?} for {rows} rows", l1.dims(), l2.dims());
                }
                (kd, nd, Shape::from((e, nd, kd)))
            }
        };
        typed!(dtype, self.name(), T => {
            let lhs = contiguous::<T>(s1, l1, self.name())?;
            let rhs = contiguous::<T>(s2, l2, self.name())?;
            let n_out = out_shape.elem_count();
            // Tn skips experts without rows: their gradient must read zero; a padded layout's
            // unused rows are written by the batched GEMM itself
            let mut out = if self.product == Product::Tn { p.dev.alloc_zeros::<T>(n_out.max(1))? } else { unsafe { p.dev.alloc::<T>(n_out.max(1))? } };
            let stream = p.dev.cuda_stream();
            {
                let (lp, _g1) = lhs.device_ptr(&stream);
                let (rp, _g2) = rhs.device_ptr(&stream);
                let (op, _g3) = out.device_ptr_mut(&stream);
                unsafe { gemm::run(&p.dev, p.imp, &p.layout, self.product, dtype, kdim, ndim, lp, rp, op)? };
            }
            Ok((CudaStorage::wrap_cuda_slice(out, p.dev.clone()), out_shape))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.product != Product::Nt {
            candle_core::bail!("moe-grouped-mm: no second derivative");
        }
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &GroupedMm { plan: self.plan.clone(), product: Product::Nn })?;
        let dw = grad.apply_op2_no_bwd(x, &GroupedMm { plan: self.plan.clone(), product: Product::Tn })?;
        Ok((Some(dx), Some(dw)))
    }
}

// ---------------------------------------------------------------------------------------------

/// gu_R2F → silu(gate) · up.
pub struct SwiGlu;

fn elementwise_cfg(total: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks(total.div_ceil(256), 1 << 20), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "moe-swiglu"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (r, f2) = l.shape().dims2()?;
        if f2 % 2 != 0 {
            candle_core::bail!("moe-swiglu: odd gate_up width {f2}");
        }
        let f = f2 / 2;
        let dev = s.device().clone();
        let suf = suffix(s.dtype(), self.name())?;
        typed!(s.dtype(), self.name(), T => {
            let gu = contiguous::<T>(s, l, self.name())?;
            let mut out = unsafe { dev.alloc::<T>((r * f).max(1))? };
            if r * f > 0 {
                let func = func(&dev, &format!("moe_swiglu_{suf}"))?;
                let (r64, f32_) = (r as u64, f as u32);
                let mut b = func.builder();
                b.arg(&gu).arg(&r64).arg(&f32_).arg(&mut out);
                unsafe { b.launch(elementwise_cfg(r * f)) }.w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((r, f))))
        })
    }
    fn bwd(&self, gu: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gu.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluBwd)?))
    }
}

/// (gu_R2F, da_RF) → dgu_R2F.
pub struct SwiGluBwd;

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "moe-swiglu-bwd"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (r, f2) = l1.shape().dims2()?;
        let f = f2 / 2;
        if l2.shape().dims2()? != (r, f) || s1.dtype() != s2.dtype() {
            candle_core::bail!("moe-swiglu-bwd: gu {:?} / da {:?}", l1.dims(), l2.dims());
        }
        let dev = s1.device().clone();
        let suf = suffix(s1.dtype(), self.name())?;
        typed!(s1.dtype(), self.name(), T => {
            let gu = contiguous::<T>(s1, l1, self.name())?;
            let da = contiguous::<T>(s2, l2, self.name())?;
            let mut out = unsafe { dev.alloc::<T>((r * f2).max(1))? };
            if r * f > 0 {
                let func = func(&dev, &format!("moe_swiglu_bwd_{suf}"))?;
                let (r64, f32_) = (r as u64, f as u32);
                let mut b = func.builder();
                b.arg(&gu).arg(&da).arg(&r64).arg(&f32_).arg(&mut out);
                unsafe { b.launch(elementwise_cfg(r * f)) }.w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((r, f2))))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// (y_RD, w_A f32) → out_ND = Σ_a w_a · y[pos(a)].
pub struct Combine(pub Arc<Plan>);

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
pub struct CombineBwd {
    pub plan: Arc<Plan>,
    pub want_dw: bool,
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
            let cfg = LaunchConfig { grid_dim: (blocks(a, 1 << 16), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            if self.want_dw {
                // (dout, y) → dw
                let y = contiguous::<T>(s2, l2, self.name())?;
                let mut dw = unsafe { p.dev.alloc::<f32>(a.max(1))? };
                if a > 0 {
                    let mut b = f.builder();
                    b.arg(&dout).arg(&y).arg(&null).arg(&p.token_A).arg(&p.pos_A).arg(&a32).arg(&d32).arg(&null).arg(&mut dw);
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok((CudaStorage::wrap_cuda_slice(dw, p.dev.clone()), Shape::from(a)))
            } else {
                // (dout, w) → dy; rows no assignment owns (padding) stay zero
                let w = contiguous::<f32>(s2, l2, self.name())?;
                let mut dy = if p.layout.padded.is_some() { p.dev.alloc_zeros::<T>((rows * d).max(1))? } else { unsafe { p.dev.alloc::<T>((rows * d).max(1))? } };
                if a > 0 {
                    let mut b = f.builder();
                    b.arg(&dout).arg(&null).arg(&w).arg(&p.token_A).arg(&p.pos_A).arg(&a32).arg(&d32).arg(&mut dy).arg(&null);
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok((CudaStorage::wrap_cuda_slice(dy, p.dev.clone()), Shape::from((rows, d))))
            }
        })
    }
}
