//! Where and in what a model runs, from their names: [`DeviceSpec`] (`cpu`, `cuda`, `cuda:N`)
//! and [`parse_dtype`] (`f32`, `bf16`), as the command line and configs spell them.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{ModelError, ParseError, Result};

/// A device by name: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// the GPU of this ordinal
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        let bad = || ParseError::new(s, "cpu, cuda or cuda:N (N a GPU ordinal)");
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Open the device. A CUDA device keeps freed memory in its memory pool
    /// (`gpu::keep_freed_memory`) and makes no CUDA events per buffer ([`untracked_events`]);
    /// without the `cuda` feature it cannot be opened.
    pub fn open(self) -> Result<Device> {
        let fail = |msg: String| ModelError::Device { device: self.to_string(), msg };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                let dev = Device::new_cuda(ordinal)
                    .map_err(|e| fail(format!("CUDA unavailable (this binary needs the `cuda` feature and a GPU): {e}")))?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(d) = &dev {
                    untracked_events(d);
                    crate::gpu::keep_freed_memory(d).map_err(|e| fail(format!("setting up the memory pool: {e}")))?;
                }
                Ok(dev)
            }
        }
    }
}

/// Stop cudarc from making two CUDA events for every buffer (and destroying them at its free):
/// ~450 driver calls per decoder layer of a decode step. cudarc records and waits on them only
/// in its multi-stream mode (after `CudaContext::new_stream` / `fork`), which lockstep never
/// enters (candle runs each host thread's ops on that thread's default stream), so they are made
/// and never used. Buffers made before the call keep theirs.
#[cfg(feature = "cuda")]
pub fn untracked_events(d: &candle_core::CudaDevice) {
    // SAFETY: the obligations (no buffer freed, read or written on another stream before the
    // allocating stream's work on it is done) are those cudarc's events discharge in multi-stream
    // mode only; lockstep never creates a stream (no `new_stream` / `fork` anywhere), so with or
    // without the events no cross-stream ordering is enforced — nothing changes but the calls.
    unsafe { d.disable_event_tracking() }
}

/// The dtypes a model's weights and compute run in: `f32` or `bf16`.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, ParseError> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(ParseError::new(other, "f32 or bf16")),
    }
}

/// (free, total) bytes of a GPU's memory now — free: the driver's, plus what the device's
/// default memory pool holds unused (this process's allocations reuse it); `None` for the CPU.
pub fn memory_info(device: &Device) -> Result<Option<(usize, usize)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::result;
            let ctx = d.cuda_stream().context().clone();
            let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| ModelError::Device { device: "cuda".into(), msg: format!("memory info: {e}") };
            ctx.bind_to_thread().map_err(err)?;
            let (free, total) = result::mem_get_info().map_err(err)?;
            // memory the default pool keeps (`gpu::keep_freed_memory`) but no allocation uses is
            // free to this process too; the driver counts it as taken. Without it the engine's KV
            // budget missed what building the model freed into the pool (the per-expert tensors,
            // once stacked: ~58 GB at the Qwen3-30B-A3B size, whose pool then had 4,458 blocks)
            let spare = if ctx.has_async_alloc() {
                use candle_core::cuda_backend::cudarc::driver::sys;
                let (mut reserved, mut used) = (0u64, 0u64);
                // SAFETY: the device handle comes from a live context (bound above); `reserved`
                // and `used` are u64s, the type of both attributes, and outlive the calls.
                unsafe {
                    let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(err)?;
                    result::mem_pool::get_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, (&mut reserved as *mut u64).cast()).map_err(err)?;
                    result::mem_pool::get_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, (&mut used as *mut u64).cast()).map_err(err)?;
                }
                reserved.saturating_sub(used) as usize
            } else {
                0
            };
            Ok(Some(((free + spare).min(total), total)))
        }
        _ => Ok(None),
    }
}

/// The most memory this process has had in use since the last reset (`reset`: start a new
/// window after reading): on CUDA the high watermark of the device's default memory pool, which
/// every stream-ordered allocation (candle's, through cudarc's `cuMemAllocAsync`) comes from —
/// the true peak inside a backward, not a sample between phases; on the CPU the peak resident
/// set (VmHWM of /proc/self/status; reset through /proc/self/clear_refs). `None` where neither
/// is available (a CUDA device without memory pools, a system without /proc).
pub fn memory_peak(device: &Device, reset: bool) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::{result, sys};
            let ctx = d.cuda_stream().context().clone();
            if !ctx.has_async_alloc() {
                return Ok(None);
            }
            let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| ModelError::Device { device: "cuda".into(), msg: format!("memory peak: {e}") };
            ctx.bind_to_thread().map_err(err)?;
            d.cuda_stream().synchronize().map_err(err)?;
            // SAFETY: the device handle comes from a live context (bound above); `high` is a
            // u64, the type of CU_MEMPOOL_ATTR_USED_MEM_HIGH, and outlives both calls.
            unsafe {
                let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(err)?;
                let mut high: u64 = 0;
                let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
                result::mem_pool::get_attribute(pool, attr, (&mut high as *mut u64).cast()).map_err(err)?;
                if reset {
                    let mut zero: u64 = 0;
                    result::mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast()).map_err(err)?;
                }
                Ok(Some(high))
            }
        }
        Device::Cpu => {
            let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return Ok(None) };
            let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            if reset {
                // "5" resets the peak resident set to the current one (proc(5)); a failure only
                // widens the next window
                let _ = std::fs::write("/proc/self/clear_refs", "5");
            }
            Ok(kb.map(|k| k * 1024))
        }
        #[allow(unreachable_patterns)]
        _ => Ok(None),
    }
}

/// A tensor's values as f32 on the host. On CUDA the copy goes through a page-locked staging
/// buffer (one per thread, grown as needed) — several times faster than candle's pageable copy
/// for big rows such as a decode step's logits.
pub fn to_host_f32(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
    match t.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(crate::gpu::to_host_f32(&t)?),
        _ => Ok(t.to_vec1()?),
    }
}
