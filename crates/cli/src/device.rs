//! `--device cpu|cuda[:N]` for the commands that run a model (`lockstep_model::DeviceSpec`).

use candle_core::Device;
use lockstep_model::DeviceSpec;

pub fn parse(spec: &str) -> anyhow::Result<Device> {
    let d: DeviceSpec = spec.parse().map_err(|e| anyhow::anyhow!("--device {e}"))?;
    d.open().map_err(|e| anyhow::anyhow!("--device {e}"))
}
