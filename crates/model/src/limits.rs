//! The bounds and ranges of a model config's values (leaf helpers of `config.rs`'s parser) and
//! the memory a machine has for weights; [`crate::validate`] applies them to whole configs.
//! See [`crate::validate`] for why the bounds are where they are.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// `num_hidden_layers` at most: parsing lists the MoE layers, so the bound keeps that cheap; a
/// config of many layers that parses is refused for its size by [`ModelConfig::check_fits`].
pub const MAX_LAYERS: usize = 1 << 20;
/// `hidden_size` at most.
pub const MAX_HIDDEN: usize = 1 << 17;
/// `num_attention_heads` / `num_key_value_heads` at most.
pub const MAX_HEADS: usize = 1024;
/// `head_dim` at most.
pub const MAX_HEAD_DIM: usize = 4096;
/// `num_experts` at most.
pub const MAX_EXPERTS: usize = 1 << 14;
/// `vocab_size` at most.
pub const MAX_VOCAB: usize = 1 << 24;
/// `intermediate_size`, `moe_intermediate_size`, `shared_expert_intermediate_size` at most.
pub const MAX_INTERMEDIATE: usize = 1 << 20;
/// `max_position_embeddings` at most.
pub const MAX_POSITIONS: usize = 1 << 24;
/// `n_shared_experts` / `num_shared_experts` at most.
pub const MAX_SHARED_EXPERTS: usize = 1024;
/// `rms_norm_eps` at most (it must also be > 0 and finite).
pub const MAX_RMS_NORM_EPS: f64 = 0.1;

/// `v` in `1..=max`, else an error naming `field` with its value.
pub(crate) fn sized(v: usize, max: usize, file: &str, field: &str) -> Result<usize> {
    if v == 0 {
        return Err(ModelError::config(file, field, "must be > 0"));
    }
    if v > max {
        return Err(ModelError::config(file, field, format!("{field} = {v}: exceeds the limit {max}")));
    }
    Ok(v)
}

/// `v <= max`, else an error naming `field` with its value.
pub(crate) fn check_max(v: usize, max: usize, file: &str, field: &str) -> Result<usize> {
    if v > max {
        return Err(ModelError::config(file, field, format!("{field} = {v}: exceeds the limit {max}")));
    }
    Ok(v)
}

/// `rms_norm_eps` finite and in (0, [`MAX_RMS_NORM_EPS`]].
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x > 0)`: NaN fails too
pub(crate) fn rms_norm_eps(eps: f64, file: &str) -> Result<f64> {
    if !(eps.is_finite() && eps > 0.0 && eps <= MAX_RMS_NORM_EPS) {
        return Err(ModelError::config(file, "rms_norm_eps", format!("{eps}: must be a finite number in (0, {MAX_RMS_NORM_EPS}]")));
    }
    Ok(eps)
}

/// `rope_theta` finite and > 0.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(crate) fn rope_theta(theta: f64, file: &str) -> Result<f64> {
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ModelError::config(file, "rope_theta", format!("{theta}: must be a finite number > 0")));
    }
    Ok(theta)
}

/// Decimal bytes in words: `512 B`, `22 GB`, `9.1 TB`.
pub fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 || x >= 10.0 {
        format!("{x:.0} {}", UNITS[u])
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// Bytes of memory available now: the host's `MemAvailable` (`/proc/meminfo`) for the CPU, the
/// free memory of a CUDA device; `None` where it cannot be told (the check is then skipped).
pub fn available_bytes(device: &Device) -> Result<Option<u128>> {
    if device.is_cpu() {
        return Ok(host_available());
    }
    Ok(crate::device::memory_info(device)?.map(|(free, _)| free as u128))
}

fn host_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
