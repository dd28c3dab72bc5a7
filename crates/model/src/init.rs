//! The embedded default model: a built-in tiny Qwen3-MoE config with seeded random weights, so
//! every command runs with no checkpoint on disk. Weights are drawn from a seeded ChaCha8 RNG on
//! the host (the same numbers on every machine and device): normal(0, 0.08) for matrices (enough
//! scale that routing is not degenerate), uniform(0.8, 1.2) for norm weights, zero biases.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::tensor_specs;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::MoeCausalLm;

/// `config.json` of the embedded default: 4 layers, layer 2 dense (a gap between MoE layers),
/// 8 experts, top-2, renormalised, byte-level vocabulary.
pub const DEFAULT_CONFIG_JSON: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"],
  "model_type": "qwen3_moe",
  "vocab_size": 256,
  "hidden_size": 64,
  "intermediate_size": 128,
  "moe_intermediate_size": 48,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 16,
  "hidden_act": "silu",
  "max_position_embeddings": 1024,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "num_experts": 8,
  "num_experts_per_tok": 2,
  "norm_topk_prob": true,
  "decoder_sparse_step": 1,
  "mlp_only_layers": [2],
  "tie_word_embeddings": false,
  "attention_bias": false,
  "torch_dtype": "float32"
}"#;

pub fn default_config() -> ModelConfig {
    ModelConfig::from_json_str(DEFAULT_CONFIG_JSON, "<embedded default>").expect("the embedded default config is valid")
}

/// Seeded random weights for any config, under hub tensor names.
pub fn random_weights(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.08).expect("valid normal");
    let mut out = HashMap::new();
    for (name, shape) in tensor_specs(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| rng.random_range(0.8f32..1.2)).collect()
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with("e_score_correction_bias") {
            (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, device)?);
    }
    Ok(out)
}

impl MoeCausalLm {
    /// A model for `cfg` with seeded random weights.
    pub fn random(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let ws = random_weights(cfg, seed, device)?;
        let vb = VarBuilder::from_tensors(ws, dtype, device);
        Ok(MoeCausalLm::new(cfg, vb)?)
    }

    /// The embedded default model (seed 0 unless told otherwise).
    pub fn embedded_default(seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::random(&default_config(), seed, dtype, device)
    }
}
