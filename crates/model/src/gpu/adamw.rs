//! Launches of `adamw.cu`: the AdamW update's in-place element-wise ops (the CUDA side of
//! `crate::adamw`).
//!
//! Legend: n elements (every operand of one op, contiguous).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result};
use half::bf16;

use super::adamw_func;
use super::ops::contiguous;

/// threads per block (`NT` of `adamw.cu`, its launch bound)
const THREADS: u32 = 256;
/// blocks at most: an H200's 132 SMs · 8 resident blocks, twice; the grid-stride loop takes
/// the rest
const MAX_BLOCKS: usize = 2048;

/// `Scalars` of `adamw.cu`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalars {
    pub(crate) scale: f32,
    pub(crate) beta1: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) inv_c1: f32,
    pub(crate) inv_c2: f32,
    pub(crate) eps: f32,
    pub(crate) weight_decay: f32,
    pub(crate) lr: f32,
    pub(crate) has_scale: i32,
}

// SAFETY: `Scalars` is `#[repr(C)]`, plain old data (ten f32 and an i32, no padding, no
// pointers), laid out as the kernels' `struct Scalars` (same fields, same order, same types),
// so passing it by value as a kernel argument hands the kernel exactly these bytes.
unsafe impl DeviceRepr for Scalars {}

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn dst_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} must be contiguous (it is written in place)")))
}

fn check_len(got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        candle_core::bail!("adamw: {what} holds {got} elements, the destination {want}");
    }
    Ok(())
}

/// m (`second` false) or v (f32, contiguous) updated in place from g (f32, as many elements);
/// `first`: no previous moment.
pub(crate) fn moment(dst: &mut CudaStorage, ld: &Layout, g: &CudaStorage, lg: &Layout, s: Scalars, second: bool, first: bool) -> Result<()> {
    let dev = dst.device().clone();
    let (a, b) = dst_range(ld, "moment")?;
    let gv = contiguous::<f32>(g, lg, "adamw g")?;
    let n = b - a;
    check_len(gv.len(), n, "g")?;
    let mut dv = dst.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let (n64, first) = (n as u64, i32::from(first));
    let f = adamw_func(&dev, if second { "adamw_moment2" } else { "adamw_moment1" })?;
    let mut lb = f.builder();
    lb.arg(&mut dv).arg(&gv).arg(&n64).arg(&s).arg(&first);
    // SAFETY: the arguments are those of `adamw_moment{1,2}(dst, g, n, s, first)` in order: dst
    // the view of the destination's n f32 elements, g the view of g's n contiguous f32
    // elements, n a size_t (u64, 64-bit targets only), s the `Scalars` struct by value (its
    // DeviceRepr above), first an int. dst and g do not overlap: `Tensor::inplace_op2` refuses
    // a source sharing the destination's storage (the op declares no aliased access), so the
    // kernel's `__restrict__` holds. The grid-stride loop touches only indices < n.
    unsafe { lb.launch(grid(n)) }.w()?;
    Ok(())
}

/// θ (f32, contiguous) updated in place from the new m and v (f32, as many elements).
pub(crate) fn theta(dst: &mut CudaStorage, ld: &Layout, m: &CudaStorage, lm: &Layout, v: &CudaStorage, lv: &Layout, s: Scalars) -> Result<()> {
    let dev = dst.device().clone();
    let (a, b) = dst_range(ld, "theta")?;
    let mv = contiguous::<f32>(m, lm, "adamw m")?;
    let vv = contiguous::<f32>(v, lv, "adamw v")?;
    let n = b - a;
    check_len(mv.len(), n, "m")?;
    check_len(vv.len(), n, "v")?;
    let mut tv = dst.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let n64 = n as u64;
    let f = adamw_func(&dev, "adamw_theta")?;
    let mut lb = f.builder();
    lb.arg(&mut tv).arg(&mv).arg(&vv).arg(&n64).arg(&s);
    // SAFETY: the arguments are those of `adamw_theta(theta, m, v, n, s)` in order: theta the
    // view of the destination's n f32 elements, m and v views of n contiguous f32 elements
    // each, n a size_t (u64), s the `Scalars` struct by value. theta overlaps neither m nor v
    // (`Tensor::inplace_op3` refuses sources sharing the destination's storage); m and v are
    // only read, so `__restrict__` holds. Only indices < n are touched.
    unsafe { lb.launch(grid(n)) }.w()?;
    Ok(())
}

fn cast_typed<P: candle_core::cuda_backend::CudaDType + DeviceRepr>(dst: &mut CudaStorage, ld: &Layout, theta: &CudaStorage, lt: &Layout, name: &str) -> Result<()> {
    let dev = dst.device().clone();
    let (a, b) = dst_range(ld, "parameter")?;
    let tv = contiguous::<f32>(theta, lt, "adamw theta")?;
    let n = b - a;
    check_len(tv.len(), n, "theta")?;
    let mut pv = dst.as_cuda_slice_mut::<P>()?.slice_mut(a..b);
    let n64 = n as u64;
    let f = adamw_func(&dev, name)?;
    let mut lb = f.builder();
    lb.arg(&mut pv).arg(&tv).arg(&n64);
    // SAFETY: the arguments are those of `adamw_cast_<p>(p, theta, n)` in order: p the view of
    // the destination's n elements of type P (the kernel's element type for `name`), theta n
    // contiguous f32 elements, n a size_t (u64). They do not overlap (`Tensor::inplace_op2`
    // refuses a source sharing the destination's storage). Only indices < n are touched.
    unsafe { lb.launch(grid(n)) }.w()?;
    Ok(())
}

/// The parameter (f32 or bf16, contiguous) overwritten with θ (f32) rounded to its dtype.
pub(crate) fn cast(dst: &mut CudaStorage, ld: &Layout, theta: &CudaStorage, lt: &Layout) -> Result<()> {
    match dst.dtype() {
        DType::BF16 => cast_typed::<bf16>(dst, ld, theta, lt, "adamw_cast_bf16"),
        DType::F32 => cast_typed::<f32>(dst, ld, theta, lt, "adamw_cast_f32"),
        other => candle_core::bail!("adamw: parameter is {other:?}, expected f32 or bf16"),
    }
}
