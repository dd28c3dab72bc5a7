//! CUDA-event timing shared by the GPU benchmarks (`bench-moe`, `bench-ep`, `bench-invariant`).

use anyhow::bail;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::Device;

/// The device's stream (candle's: the calling thread's default stream).
pub fn stream(dev: &Device) -> anyhow::Result<std::sync::Arc<CudaStream>> {
    let Device::Cuda(cd) = dev else { bail!("not a CUDA device") };
    Ok(cd.cuda_stream())
}

/// Milliseconds of the work `f` enqueues, between two events on `stream`.
pub fn event_ms<F: FnMut() -> anyhow::Result<()>>(stream: &CudaStream, mut f: F) -> anyhow::Result<f64> {
    let e0 = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    f()?;
    let e1 = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    e1.synchronize()?;
    Ok(e0.elapsed_ms(&e1)? as f64)
}

/// (median, min) ms of `f` over `iters` runs after `warmup` untimed ones.
pub fn median_min_ms<F: FnMut() -> anyhow::Result<()>>(dev: &Device, warmup: usize, iters: usize, mut f: F) -> anyhow::Result<(f64, f64)> {
    let stream = stream(dev)?;
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize()?;
    let mut ms = (0..iters.max(1)).map(|_| event_ms(&stream, &mut f)).collect::<anyhow::Result<Vec<f64>>>()?;
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok((ms[ms.len() / 2], ms[0]))
}
