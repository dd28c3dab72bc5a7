//! Model configuration: Hugging Face `config.json` through serde, normalised into a config tree
//! that mirrors the module tree (attention, dense MLP, MoE block and its router).
//!
//! Both spellings seen in the wild are accepted: hub checkpoints write `num_experts` and
//! `rope_theta`; transformers 5 writes `num_local_experts` and `rope_parameters.rope_theta`.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Architectures this crate implements (the `architectures[0]` entry of `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// QK-norm, GQA, RoPE, softmax top-k router, optional `norm_topk_prob`.
    Qwen3Moe,
    /// q/k/v bias, softmax top-k router, shared expert gated by `sigmoid(shared_expert_gate(x))`.
    Qwen2Moe,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
        }
    }
    fn from_names(arch: Option<&str>, model_type: Option<&str>, file: &str) -> Result<Self> {
        match (arch, model_type) {
            (Some("Qwen3MoeForCausalLM"), _) | (None, Some("qwen3_moe")) => Ok(Architecture::Qwen3Moe),
            (Some("Qwen2MoeForCausalLM"), _) | (None, Some("qwen2_moe")) => Ok(Architecture::Qwen2Moe),
            (Some(other), _) => Err(ModelError::config(
                file,
                "architectures",
                format!("unknown architecture `{other}` (supported: Qwen3MoeForCausalLM, Qwen2MoeForCausalLM)"),
            )),
            (None, other) => Err(ModelError::config(
                file,
                "architectures",
                format!("missing, and model_type {other:?} is not qwen3_moe / qwen2_moe"),
            )),
        }
    }
}

/// Self-attention block.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bias on q/k/v projections (Qwen2-MoE; `attention_bias` in Qwen3-MoE).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` in Qwen3-MoE only).
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    pub rope_theta: f64,
    /// Leading dimensions of each head that RoPE rotates (= head_dim unless partial rotary).
    pub rotary_dim: usize,
}

/// Router of a token-choice MoE block.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Renormalise the selected probabilities to sum to one.
    pub norm_topk_prob: bool,
}

/// A shared expert that every token passes through (Qwen2-MoE).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertConfig {
    pub intermediate_size: usize,
    /// Output scaled by `sigmoid(shared_expert_gate(x))`.
    pub gated: bool,
}

/// Sparse MoE block: router + routed experts (+ shared expert).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeBlockConfig {
    pub router: RouterConfig,
    pub expert_intermediate_size: usize,
    pub shared_expert: Option<SharedExpertConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention: AttentionConfig,
    /// Width of the dense SwiGLU MLP used by non-MoE layers.
    pub dense_intermediate_size: usize,
    pub moe: MoeBlockConfig,
    /// Decoder layer indices that carry an MoE block, ascending (the others are dense).
    pub moe_layers: Vec<usize>,
    /// The parsed `config.json`, kept so a saved checkpoint writes it back unchanged.
    pub raw: Value,
}

/// `config.json` as written by transformers (4.x hub and 5.x spellings).
#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
}

fn need<T>(v: Option<T>, file: &str, field: &str) -> Result<T> {
    v.ok_or_else(|| ModelError::config(file, field, "missing"))
}

fn positive(v: usize, file: &str, field: &str) -> Result<usize> {
    if v == 0 {
        return Err(ModelError::config(file, field, "must be > 0"));
    }
    Ok(v)
}

impl ModelConfig {
    /// Parse `config.json` text. `file` names the source in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(file, "<json>", e.to_string()))?;
        let hf: HfConfig = serde_path_to_error::deserialize(raw.clone())
            .map_err(|e| ModelError::config(file, &e.path().to_string(), e.inner().to_string()))?;
        Self::from_hf(hf, raw, file)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::config(&file, "<file>", e.to_string()))?;
        Self::from_json_str(&text, &file)
    }

    fn from_hf(hf: HfConfig, raw: Value, file: &str) -> Result<Self> {
        let arch_name = hf.architectures.as_ref().and_then(|a| a.first()).map(String::as_str);
        let architecture = Architecture::from_names(arch_name, hf.model_type.as_deref(), file)?;
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(ModelError::config(file, "hidden_act", format!("`{act}` unsupported (only silu)")));
            }
        }
        if hf.use_sliding_window == Some(true) {
            return Err(ModelError::config(file, "use_sliding_window", "sliding-window attention is not supported"));
        }
        let vocab_size = positive(need(hf.vocab_size, file, "vocab_size")?, file, "vocab_size")?;
        let hidden_size = positive(need(hf.hidden_size, file, "hidden_size")?, file, "hidden_size")?;
        let num_layers = positive(need(hf.num_hidden_layers, file, "num_hidden_layers")?, file, "num_hidden_layers")?;
        let num_heads = positive(need(hf.num_attention_heads, file, "num_attention_heads")?, file, "num_attention_heads")?;
        let num_kv_heads = positive(hf.num_key_value_heads.unwrap_or(num_heads), file, "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::config(
                file,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match hf.head_dim {
            Some(d) => positive(d, file, "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(ModelError::config(file, "head_dim", "missing and hidden_size is not divisible by num_attention_heads"));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(file, "head_dim", format!("{head_dim} must be even for RoPE")));
        }
        let rope_theta = rope_theta(&hf, file)?;
        let num_experts = match (hf.num_experts, hf.num_local_experts) {
            (Some(a), Some(b)) if a != b => {
                return Err(ModelError::config(file, "num_experts", format!("{a} disagrees with num_local_experts {b}")))
            }
            (Some(a), _) | (None, Some(a)) => positive(a, file, "num_experts")?,
            (None, None) => return Err(ModelError::config(file, "num_experts", "missing (also looked for num_local_experts)")),
        };
        let top_k = positive(need(hf.num_experts_per_tok, file, "num_experts_per_tok")?, file, "num_experts_per_tok")?;
        if top_k > num_experts {
            return Err(ModelError::config(
                file,
                "num_experts_per_tok",
                format!("{top_k} exceeds the number of experts {num_experts}"),
            ));
        }
        let step = positive(hf.decoder_sparse_step.unwrap_or(1), file, "decoder_sparse_step")?;
        let mlp_only = hf.mlp_only_layers.unwrap_or_default();
        if let Some(bad) = mlp_only.iter().find(|&&l| l >= num_layers) {
            return Err(ModelError::config(file, "mlp_only_layers", format!("layer {bad} >= num_hidden_layers {num_layers}")));
        }
        // transformers: sparse iff not in mlp_only_layers and (idx + 1) % decoder_sparse_step == 0.
        let moe_layers: Vec<usize> =
            (0..num_layers).filter(|l| !mlp_only.contains(l) && (l + 1) % step == 0).collect();
        let expert_intermediate_size =
            positive(need(hf.moe_intermediate_size, file, "moe_intermediate_size")?, file, "moe_intermediate_size")?;
        let dense_intermediate_size = match hf.intermediate_size {
            Some(i) => positive(i, file, "intermediate_size")?,
            None if moe_layers.len() == num_layers => 0,
            None => return Err(ModelError::config(file, "intermediate_size", "missing, and the model has dense layers")),
        };
        let (qkv_bias, o_bias, qk_norm, shared_expert) = match architecture {
            Architecture::Qwen3Moe => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, true, None)
            }
            Architecture::Qwen2Moe => {
                let shared = match hf.shared_expert_intermediate_size {
                    Some(0) | None => None,
                    Some(i) => Some(SharedExpertConfig { intermediate_size: i, gated: true }),
                };
                (hf.qkv_bias.unwrap_or(true), false, false, shared)
            }
        };
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            num_layers,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention: AttentionConfig {
                num_heads,
                num_kv_heads,
                head_dim,
                qkv_bias,
                o_bias,
                qk_norm,
                rope_theta,
                rotary_dim: head_dim,
            },
            dense_intermediate_size,
            moe: MoeBlockConfig {
                router: RouterConfig { num_experts, top_k, norm_topk_prob: hf.norm_topk_prob.unwrap_or(false) },
                expert_intermediate_size,
                shared_expert,
            },
            moe_layers,
            raw,
        })
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.binary_search(&layer).is_ok()
    }

    /// Serialise back to `config.json` (the text that was parsed, fields unchanged).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.raw).expect("a serde_json::Value always serialises")
    }
}

/// `rope_theta` at the top level (hub) or inside `rope_parameters` (transformers 5); only the
/// default RoPE type is implemented, anything else is refused rather than silently wrong.
fn rope_theta(hf: &HfConfig, file: &str) -> Result<f64> {
    let from_params = hf.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
    for (field, params) in [("rope_parameters", &hf.rope_parameters), ("rope_scaling", &hf.rope_scaling)] {
        if let Some(t) = params.as_ref().and_then(|p| p.get("rope_type").or_else(|| p.get("type"))).and_then(Value::as_str) {
            if t != "default" {
                return Err(ModelError::config(file, field, format!("rope_type `{t}` is not supported (only default)")));
            }
        }
    }
    match (hf.rope_theta, from_params) {
        (Some(a), Some(b)) if a != b => {
            Err(ModelError::config(file, "rope_theta", format!("{a} disagrees with rope_parameters.rope_theta {b}")))
        }
        (Some(t), _) | (None, Some(t)) if t > 0.0 => Ok(t),
        (Some(_), _) | (None, Some(_)) => Err(ModelError::config(file, "rope_theta", "must be > 0")),
        (None, None) => Ok(10_000.0),
    }
}
