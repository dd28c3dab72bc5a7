//! The embedded default model: a built-in tiny Qwen3-MoE config with seeded random weights, so
//! every command runs with no checkpoint on disk; and the other named configs ([`Preset`]): the
//! wide model of the consistency and invariant-kernel benchmarks, one MoE layer of a given
//! shape (expert-parallel benchmarks). Weights are drawn from a seeded ChaCha8 RNG on
//! the host (the same numbers on every machine and device): normal(0, 0.08) for matrices (enough
//! scale that routing is not degenerate), uniform(0.8, 1.2) for norm weights, zero biases.

use std::collections::HashMap;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::tensor_specs;
use crate::config::ModelConfig;
use crate::error::{ParseError, Result};
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

/// `config.json` of the wide preset: hidden 1024, expert width 768, 2 MoE layers of 8 experts,
/// top-2 (sizes where kernel costs show).
pub const WIDE_CONFIG_JSON: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 1024,
  "intermediate_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 2,
  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
  "rope_theta": 1000000.0, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true}"#;

/// Named model configs, for random-weight models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The embedded default ([`DEFAULT_CONFIG_JSON`]).
    Default,
    /// The wide model ([`WIDE_CONFIG_JSON`]).
    Wide,
    /// One Qwen3-MoE decoder layer with this MoE block (vocabulary 256, attention 16 heads of 128
    /// over 4 KV heads, dense width 4 · hidden; bf16 in `torch_dtype`): Qwen3-30B-A3B's MoE layer
    /// is hidden 2048, ffn 768, 128 experts, top-8.
    MoeLayer { hidden: usize, ffn: usize, experts: usize, top_k: usize },
}

/// `default` or `wide` (a [`Preset::MoeLayer`] needs its shape).
impl FromStr for Preset {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "default" => Ok(Preset::Default),
            "wide" => Ok(Preset::Wide),
            other => Err(ParseError::new(other, "default or wide")),
        }
    }
}

impl Preset {
    /// The preset's config (a `MoeLayer` shape is validated like any `config.json`).
    pub fn config(&self) -> Result<ModelConfig> {
        match *self {
            Preset::Default => Ok(default_config()),
            Preset::Wide => ModelConfig::from_json_str(WIDE_CONFIG_JSON, "<wide>"),
            Preset::MoeLayer { hidden, ffn, experts, top_k } => {
                let json = serde_json::json!({
                    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256,
                    "hidden_size": hidden, "intermediate_size": 4 * hidden, "moe_intermediate_size": ffn,
                    "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
                    "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                    "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": true,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": false, "torch_dtype": "bfloat16"
                });
                ModelConfig::from_json_str(&json.to_string(), "<moe-layer preset>")
            }
        }
    }

    /// A model of the preset's config with seeded random weights ([`MoeCausalLm::random`]).
    pub fn model(&self, seed: u64, dtype: DType, device: &Device) -> Result<MoeCausalLm> {
        MoeCausalLm::random(&self.config()?, seed, dtype, device)
    }
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
        // drawn in f32: refused by size before any tensor is made
        cfg.check_fits("<config>", DType::F32, device)?;
        let ws = random_weights(cfg, seed, device)?;
        let vb = VarBuilder::from_tensors(ws, dtype, device);
        Ok(MoeCausalLm::new(cfg, vb)?)
    }

    /// The embedded default model (seed 0 unless told otherwise): [`Preset::Default`].
    pub fn embedded_default(seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Preset::Default.model(seed, dtype, device)
    }
}

impl MoeCausalLm {
    /// A model for `cfg` with random weights drawn on `device` itself (its own generator seeded
    /// with `seed`, not the host's): how a benchmark makes a full-size model that does not fit
    /// the host's memory in f32 or a disk as a checkpoint. Weights ~ N(0, 0.08²), norms
    /// U(0.8, 1.2), biases 0 — the distributions of [`random_weights`], not its values.
    /// On the CPU (which candle cannot seed) it is [`MoeCausalLm::random`].
    pub fn random_on_device(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            return Self::random(cfg, seed, dtype, device);
        }
        cfg.check_fits("<config>", dtype, device)?;
        device.set_seed(seed)?;
        let mut ws = HashMap::new();
        for (name, shape) in tensor_specs(cfg) {
            let t = if name.ends_with("norm.weight") {
                Tensor::rand(0.8f32, 1.2, shape, device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, device)?
            } else if name.ends_with("e_score_correction_bias") {
                Tensor::rand(-0.1f32, 0.1, shape, device)?
            } else {
                Tensor::randn(0f32, 0.08, shape, device)?
            };
            ws.insert(name, t.to_dtype(dtype)?);
        }
        let vb = VarBuilder::from_tensors(ws, dtype, device);
        Ok(MoeCausalLm::new(cfg, vb)?)
    }
}
