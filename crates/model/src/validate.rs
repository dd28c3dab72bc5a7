//! Config sanity before anything is allocated: upper bounds on every size a `config.json` sets
//! (checked as each value is read, so a config with a billion layers is an error naming
//! `num_hidden_layers`, not an abort in an allocation), sane ranges for the floating-point
//! fields, and the parameter bytes the config implies checked against the memory available
//! ([`ModelConfig::check_fits`]: host RAM from `/proc/meminfo` on the CPU, free device memory
//! from [`crate::memory_info`] on CUDA) before any tensor is made.
//!
//! The bounds are far above any published model (Qwen3-235B: 94 layers, hidden 4096, 128
//! experts; DeepSeek-V3: 61 layers, 256 experts, vocabulary 129280; GLM-4.5: 92 layers) and far
//! below what would overflow the size arithmetic (u128 parameter counts) or make parsing itself
//! allocate much; what fits the machine is [`ModelConfig::check_fits`]'s to say.

use candle_core::{DType, Device};

use crate::config::{AttentionMode, ModelConfig, Pool, RouterConfig, RoutingStrategy};
use crate::error::{ModelError, Result};
pub use crate::limits::*;

impl ModelConfig {
    /// Parameters the config implies (every tensor of [`crate::checkpoint::tensor_specs`],
    /// computed from the sizes without listing them; u128, no overflow within the bounds).
    pub fn param_count(&self) -> u128 {
        let (layers, embed) = self.param_split();
        layers + embed
    }

    /// (decoder layers, everything else) parameters.
    fn param_split(&self) -> (u128, u128) {
        let w = |x: usize| x as u128;
        let d = w(self.hidden_size);
        let a = &self.attention;
        let (h, g, dh) = (w(a.num_heads), w(a.num_kv_heads), w(a.head_dim));
        let mut attn = (h + 2 * g) * dh * d + d * h * dh + 2 * d;
        if a.qkv_bias {
            attn += (h + 2 * g) * dh;
        }
        if a.o_bias {
            attn += d;
        }
        if a.qk_norm {
            attn += 2 * dh;
        }
        let m = &self.moe;
        let e = w(m.router.num_experts);
        let mut moe = e * d + e * 3 * d * w(m.expert_intermediate_size);
        if m.router.expert_bias {
            moe += e;
        }
        if let Some(s) = &m.shared_expert {
            moe += 3 * d * w(s.intermediate_size) + if s.gated { d } else { 0 };
        }
        let dense = 3 * d * w(self.dense_intermediate_size);
        let n_moe = w(self.moe_layers.len());
        let n_dense = w(self.num_layers) - n_moe;
        let layers = w(self.num_layers) * attn + n_moe * moe + n_dense * dense;
        let vocab = w(self.vocab_size) * d * if self.tie_word_embeddings { 1 } else { 2 };
        (layers, vocab + d)
    }

    /// Bytes of the weights in `dtype`.
    pub fn weight_bytes(&self, dtype: DType) -> u128 {
        self.param_count() * dtype.size_in_bytes() as u128
    }

    /// Refuse a config whose weights in `dtype` need more than `available` bytes (`what`: the
    /// device, in words); the error names the dominant size field and both sizes, e.g.
    /// `num_hidden_layers = 900: the weights need 9.1 TB (f32), cpu has 22 GB available`.
    pub fn check_fits_in(&self, file: &str, dtype: DType, available: u128, what: &str) -> Result<()> {
        let need = self.weight_bytes(dtype);
        if need <= available {
            return Ok(());
        }
        let (layers, rest) = self.param_split();
        let (field, value) = if layers >= rest { ("num_hidden_layers", self.num_layers) } else { ("vocab_size", self.vocab_size) };
        Err(ModelError::config(
            file,
            field,
            format!(
                "{field} = {value}: the weights need {} ({} parameters in {dtype:?}; num_hidden_layers = {}, hidden_size = {}, \
                 num_experts = {}, moe_intermediate_size = {}, vocab_size = {}), {what} has {} available",
                human_bytes(need),
                self.param_count(),
                self.num_layers,
                self.hidden_size,
                self.moe.router.num_experts,
                self.moe.expert_intermediate_size,
                self.vocab_size,
                human_bytes(available)
            ),
        ))
    }

    /// [`ModelConfig::check_fits_in`] with the memory `device` has available now (host RAM on
    /// the CPU, free memory on CUDA); skipped where that cannot be told. Call it before any
    /// tensor of the model is made: [`crate::MoeCausalLm::load`] does.
    pub fn check_fits(&self, file: &str, dtype: DType, device: &Device) -> Result<()> {
        match available_bytes(device)? {
            Some(avail) => {
                let what = if device.is_cpu() { "the host (MemAvailable)".to_string() } else { format!("the device {:?}", device.location()) };
                self.check_fits_in(file, dtype, avail, &what)
            }
            None => Ok(()),
        }
    }
}

impl RouterConfig {
    /// Check the fields against each other; `file` names the source in errors.
    pub fn validate(&self, file: &str, attention: AttentionMode, allow_causal_pool: bool) -> Result<()> {
        let e = self.num_experts;
        if self.top_k == 0 || self.top_k > e {
            return Err(ModelError::config(file, "num_experts_per_tok", format!("{} must be in 1..={e} (the number of experts)", self.top_k)));
        }
        if self.n_group == 0 || e % self.n_group != 0 {
            return Err(ModelError::config(file, "n_group", format!("{} does not divide the number of experts {e}", self.n_group)));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(ModelError::config(file, "topk_group", format!("{} must be in 1..={} (n_group)", self.topk_group, self.n_group)));
        }
        if self.n_group > 1 && self.topk_group * (e / self.n_group) < self.top_k {
            return Err(ModelError::config(file, "topk_group", format!("{} groups of {} experts hold fewer than top-k {}", self.topk_group, e / self.n_group, self.top_k)));
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(ModelError::config(file, "routed_scaling_factor", "must be a finite number > 0"));
        }
        if let RoutingStrategy::ExpertChoice { capacity_factor, pool } = self.strategy {
            if !(capacity_factor.is_finite() && capacity_factor > 0.0) {
                return Err(ModelError::config(file, "capacity_factor", format!("{capacity_factor} must be > 0")));
            }
            let wide = !matches!(pool, Pool::Block(1));
            if wide && attention == AttentionMode::Causal && !allow_causal_pool {
                return Err(ModelError::config(
                    file,
                    "expert_choice_pool",
                    format!(
                        "{pool:?} with causal attention lets a token's route depend on later tokens (leaks the \
                         future); use bidirectional/block attention, pool block:1, or set \
                         allow_causal_expert_choice = true"
                    ),
                ));
            }
            if self.n_group > 1 {
                return Err(ModelError::config(file, "n_group", "group-limited selection applies to token choice only"));
            }
        }
        Ok(())
    }
}
