//! `--device cpu|cuda[:N]` for the commands that run a model.

use anyhow::{bail, Context};
use candle_core::Device;

pub fn parse(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().with_context(|| format!("--device {s}: bad GPU ordinal"))?,
                None => 0,
            };
            let dev = Device::new_cuda(ordinal).with_context(|| {
                format!("--device {s}: CUDA unavailable (this binary needs the `cuda` feature and a GPU)")
            })?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &dev {
                lockstep_model::gpu::keep_freed_memory(d).with_context(|| format!("--device {s}: setting up the memory pool"))?;
            }
            Ok(dev)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}
