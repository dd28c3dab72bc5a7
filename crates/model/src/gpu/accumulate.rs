//! Launch of `accumulate.cu`: acc += g in place, acc f32, g f32 or bf16 (the CUDA side of
//! `crate::accumulate`).
//!
//! Legend: n elements (acc and g alike, both contiguous).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};
use half::bf16;

use super::accumulate_func;
use super::ops::contiguous;

/// threads per block (`NT` of `accumulate.cu`, its launch bound)
const THREADS: u32 = 256;
/// elements per thread step on the vector path
const VEC: usize = 4;
/// blocks at most: enough to fill an H200 (132 SMs · 8 resident blocks) twice over; the
/// grid-stride loop takes the rest
const MAX_BLOCKS: usize = 2048;

fn launch<G: CudaDType + DeviceRepr>(acc: &mut CudaStorage, la: &Layout, g: &CudaStorage, lg: &Layout, name: &'static str) -> Result<()> {
    let dev = acc.device().clone();
    let Some((a0, a1)) = la.contiguous_offsets() else { candle_core::bail!("accumulate: acc must be contiguous (it is written in place)") };
    let gv = contiguous::<G>(g, lg, "accumulate g")?;
    let n = a1 - a0;
    if gv.len() != n {
        candle_core::bail!("accumulate: acc holds {n} elements, g {}", gv.len());
    }
    if n == 0 {
        return Ok(());
    }
    let mut av = acc.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a1);
    let n64 = n as u64;
    let blocks = n.div_ceil(VEC * THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    let f = accumulate_func(&dev, name)?;
    let mut b = f.builder();
    b.arg(&mut av).arg(&gv).arg(&n64);
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are those of `accumulate_f32_<g>(acc, g, n)` in order, G g's element
    // type, n a size_t (u64 here, 64-bit targets only): acc is the view of exactly the n f32
    // elements of acc's layout (contiguous, from its start offset), g the view of g's n
    // contiguous elements. They do not overlap: `Tensor::inplace_op2` refuses a g that shares
    // acc's storage (the op declares no aliased access), so the kernel's `__restrict__` holds.
    // The kernel reads and writes only indices < n of each (a grid-stride loop over size_t
    // indices plus a head and a tail of < 4 elements done by threads 0..3; every block has
    // THREADS ≥ 4 threads, the launch bound), and takes any pointer alignment.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// acc (contiguous f32) += g (contiguous f32 or bf16, as many elements) on the device's stream.
pub(crate) fn add_into(acc: &mut CudaStorage, la: &Layout, g: &CudaStorage, lg: &Layout) -> Result<()> {
    match (acc.dtype(), g.dtype()) {
        (DType::F32, DType::F32) => launch::<f32>(acc, la, g, lg, "accumulate_f32_f32"),
        (DType::F32, DType::BF16) => launch::<bf16>(acc, la, g, lg, "accumulate_f32_bf16"),
        (a, b) => candle_core::bail!("accumulate: acc {a:?} with g {b:?} (acc f32, g f32 or bf16)"),
    }
}
