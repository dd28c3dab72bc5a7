//! Model configuration: Hugging Face `config.json` through serde, normalised into a config tree
//! that mirrors the module tree (attention, dense MLP, MoE block and its router).
//!
//! Both spellings seen in the wild are accepted: hub checkpoints write `num_experts` and
//! `rope_theta`; transformers 5 writes `num_local_experts` and `rope_parameters.rope_theta`.

use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, ParseError, Result};
use crate::limits::{self, sized};

/// Architectures this crate implements (the `architectures[0]` entry of `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// QK-norm, GQA, RoPE, softmax top-k router, optional `norm_topk_prob`.
    Qwen3Moe,
    /// q/k/v bias, softmax top-k router, shared expert gated by `sigmoid(shared_expert_gate(x))`.
    Qwen2Moe,
    /// Sigmoid scores + selection-only expert bias, group-limited top-k, routed scaling, shared
    /// experts, `first_k_dense_replace` dense layers, QK-norm, partial rotary (DeepSeek-V3 family).
    Glm4Moe,
    /// LLaDA2-MoE (`configuration_llada2_moe.py` fields: `use_qkv_bias`, `use_bias`,
    /// `use_qk_norm`, `score_function`, `n_group`, ...) on the same router code. Checkpoints load
    /// under the hub's tensor names (fused `attention.query_key_value`, `attention.dense`,
    /// `mlp.gate.expert_bias`, `word_embeddings`: see `checkpoint`) or lockstep's Qwen-style names.
    Llada2Moe,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Glm4Moe => "Glm4MoeForCausalLM",
            Architecture::Llada2Moe => "LLaDA2MoeModelLM",
        }
    }
    fn from_names(arch: Option<&str>, model_type: Option<&str>, file: &str) -> Result<Self> {
        match (arch, model_type) {
            (Some("Qwen3MoeForCausalLM"), _) | (None, Some("qwen3_moe")) => Ok(Architecture::Qwen3Moe),
            (Some("Qwen2MoeForCausalLM"), _) | (None, Some("qwen2_moe")) => Ok(Architecture::Qwen2Moe),
            (Some("Glm4MoeForCausalLM"), _) | (None, Some("glm4_moe")) => Ok(Architecture::Glm4Moe),
            (Some("LLaDA2MoeModelLM"), _) | (None, Some("llada2_moe")) => Ok(Architecture::Llada2Moe),
            (Some(other), _) => Err(ModelError::config(
                file,
                "architectures",
                format!(
                    "unknown architecture `{other}` (supported: Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, \
                     Glm4MoeForCausalLM, LLaDA2MoeModelLM)"
                ),
            )),
            (None, other) => Err(ModelError::config(
                file,
                "architectures",
                format!("missing, and model_type {other:?} is not qwen3_moe / qwen2_moe / glm4_moe / llada2_moe"),
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
    /// Bias on q/k/v projections (Qwen2-MoE; `attention_bias` in Qwen3-MoE / GLM-4.5;
    /// `use_qkv_bias` in LLaDA2).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` in Qwen3-MoE; `use_bias` in LLaDA2).
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    pub rope_theta: f64,
    /// Leading dimensions of each head that RoPE rotates (= head_dim unless partial rotary).
    pub rotary_dim: usize,
    pub mode: AttentionMode,
}

/// Which keys a query may see (within its own sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    /// Keys at or before the query (autoregressive LMs).
    Causal,
    /// Every key of the sequence (diffusion LMs).
    Bidirectional,
    /// Every key of the query's block and of earlier blocks (block diffusion, LLaDA2);
    /// blocks are `positions / block_size`.
    Block(usize),
}

/// `causal`, `bidirectional` or `block:N` (N > 0).
impl FromStr for AttentionMode {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "causal" => Ok(AttentionMode::Causal),
            "bidirectional" => Ok(AttentionMode::Bidirectional),
            _ => match block_size(s) {
                Some(n) => Ok(AttentionMode::Block(n)),
                None => Err(ParseError::new(s, "causal, bidirectional or block:N (N > 0)")),
            },
        }
    }
}

/// N of `block:N`, N > 0.
fn block_size(s: &str) -> Option<usize> {
    s.strip_prefix("block:").and_then(|n| n.parse::<usize>().ok()).filter(|&n| n > 0)
}

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// softmax over experts (Qwen)
    Softmax,
    /// independent sigmoid per expert (DeepSeek-V3, GLM-4.5, LLaDA2)
    Sigmoid,
}

/// Where an expert-choice router's experts pick their tokens from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// consecutive blocks of this many tokens of one sequence (by position)
    Block(usize),
    /// all tokens of one sequence
    Sequence,
    /// all real tokens of the micro-batch
    Batch,
}

/// `block:N` (N > 0), `sequence` or `batch`.
impl FromStr for Pool {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "sequence" => Ok(Pool::Sequence),
            "batch" => Ok(Pool::Batch),
            _ => match block_size(s) {
                Some(n) => Ok(Pool::Block(n)),
                None => Err(ParseError::new(s, "block:N (N > 0), sequence or batch")),
            },
        }
    }
}

/// Token choice (each token picks k experts) or expert choice (each expert picks tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingStrategy {
    TokenChoice,
    /// Each expert takes its top-C tokens of each pool, C = ceil(capacity_factor · pool / E)
    /// (at most the pool).
    ExpertChoice { capacity_factor: f64, pool: Pool },
}

/// `token-choice`, or `expert-choice` with `config.json`'s defaults (capacity factor 1, pool
/// `sequence`; set others in the variant's fields).
impl FromStr for RoutingStrategy {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "token-choice" => Ok(RoutingStrategy::TokenChoice),
            "expert-choice" => Ok(RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Sequence }),
            other => Err(ParseError::new(other, "token-choice or expert-choice")),
        }
    }
}

/// Router of an MoE block.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub num_experts: usize,
    /// Experts per token (token choice); the nominal k for expert choice's capacity.
    pub top_k: usize,
    /// Renormalise the selected scores to sum to one (token choice).
    pub norm_topk_prob: bool,
    pub score_function: ScoreFunction,
    /// A per-expert bias added to the scores for *selection only* (`e_score_correction_bias`).
    pub expert_bias: bool,
    /// Group-limited selection: experts in `n_group` groups, a token picks among the experts of
    /// its `topk_group` best groups (group score = sum of the group's two best biased scores).
    pub n_group: usize,
    pub topk_group: usize,
    /// Applied weights are multiplied by this.
    pub routed_scaling_factor: f64,
    pub strategy: RoutingStrategy,
}

impl RouterConfig {
    /// The plain softmax top-k router (Qwen).
    pub fn softmax_top_k(num_experts: usize, top_k: usize, norm_topk_prob: bool) -> Self {
        Self {
            num_experts,
            top_k,
            norm_topk_prob,
            score_function: ScoreFunction::Softmax,
            expert_bias: false,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            strategy: RoutingStrategy::TokenChoice,
        }
    }
}

/// A shared expert that every token passes through (Qwen2-MoE `shared_expert`, gated;
/// GLM-4.5 / DeepSeek-V3 `shared_experts`, ungated).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertConfig {
    /// Module name under `mlp.` in the checkpoint.
    pub name: String,
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
    /// `max_position_embeddings` (a positive integer when set; `None` when config.json has none).
    pub max_position_embeddings: Option<usize>,
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
    max_position_embeddings: Option<usize>,
    num_nextn_predict_layers: Option<usize>,
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
    // GLM-4.5 / DeepSeek-V3 family
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    first_k_dense_replace: Option<usize>,
    partial_rotary_factor: Option<f64>,
    use_qk_norm: Option<bool>,
    routed_scaling_factor: Option<f64>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    // LLaDA2-MoE
    use_qkv_bias: Option<bool>,
    use_bias: Option<bool>,
    num_shared_experts: Option<usize>,
    score_function: Option<String>,
    moe_router_enable_expert_bias: Option<bool>,
    // lockstep extensions (transformers ignores unknown keys)
    routing_strategy: Option<String>,
    capacity_factor: Option<f64>,
    expert_choice_pool: Option<String>,
    attention_mode: Option<String>,
    allow_causal_expert_choice: Option<bool>,
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
        if hf.architectures.as_ref().is_some_and(Vec::is_empty) {
            return Err(ModelError::config(file, "architectures", "an empty list (name the architecture, e.g. [\"Qwen3MoeForCausalLM\"])"));
        }
        let arch_name = hf.architectures.as_ref().and_then(|a| a.first()).map(String::as_str);
        let architecture = Architecture::from_names(arch_name, hf.model_type.as_deref(), file)?;
        model_type_agrees(architecture, hf.model_type.as_deref(), file)?;
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(ModelError::config(file, "hidden_act", format!("`{act}` unsupported (only silu)")));
            }
        }
        if hf.use_sliding_window == Some(true) {
            return Err(ModelError::config(file, "use_sliding_window", "sliding-window attention is not supported"));
        }
        // every size is bounded as it is read (validate.rs), before anything is sized by it
        let vocab_size = sized(need(hf.vocab_size, file, "vocab_size")?, limits::MAX_VOCAB, file, "vocab_size")?;
        let hidden_size = sized(need(hf.hidden_size, file, "hidden_size")?, limits::MAX_HIDDEN, file, "hidden_size")?;
        let num_layers = sized(need(hf.num_hidden_layers, file, "num_hidden_layers")?, limits::MAX_LAYERS, file, "num_hidden_layers")?;
        let max_position_embeddings =
            hf.max_position_embeddings.map(|p| sized(p, limits::MAX_POSITIONS, file, "max_position_embeddings")).transpose()?;
        if let Some(n) = hf.num_nextn_predict_layers {
            limits::check_max(n, limits::MAX_LAYERS, file, "num_nextn_predict_layers")?;
        }
        let num_heads = sized(need(hf.num_attention_heads, file, "num_attention_heads")?, limits::MAX_HEADS, file, "num_attention_heads")?;
        let num_kv_heads = sized(hf.num_key_value_heads.unwrap_or(num_heads), limits::MAX_HEADS, file, "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::config(
                file,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match hf.head_dim {
            Some(d) => sized(d, limits::MAX_HEAD_DIM, file, "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(ModelError::config(file, "head_dim", "missing and hidden_size is not divisible by num_attention_heads"));
                }
                sized(hidden_size / num_heads, limits::MAX_HEAD_DIM, file, "head_dim")?
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(file, "head_dim", format!("{head_dim} must be even for RoPE")));
        }
        let rope_theta = rope_theta(&hf, file)?;
        let num_experts = match (hf.num_experts.or(hf.n_routed_experts), hf.num_local_experts) {
            (Some(a), Some(b)) if a != b => {
                return Err(ModelError::config(file, "num_experts", format!("{a} disagrees with num_local_experts {b}")))
            }
            (Some(a), _) | (None, Some(a)) => sized(a, limits::MAX_EXPERTS, file, "num_experts")?,
            (None, None) => {
                return Err(ModelError::config(file, "num_experts", "missing (also looked for num_local_experts, n_routed_experts)"))
            }
        };
        let top_k = positive(need(hf.num_experts_per_tok, file, "num_experts_per_tok")?, file, "num_experts_per_tok")?;
        if top_k > num_experts {
            return Err(ModelError::config(
                file,
                "num_experts_per_tok",
                format!("{top_k} exceeds the number of experts {num_experts}"),
            ));
        }
        let step = sized(hf.decoder_sparse_step.unwrap_or(1), limits::MAX_LAYERS, file, "decoder_sparse_step")?;
        // a set: the filter below asks it once per layer
        let mlp_only: std::collections::BTreeSet<usize> = hf.mlp_only_layers.iter().flatten().copied().collect();
        if let Some(bad) = mlp_only.iter().find(|&&l| l >= num_layers) {
            return Err(ModelError::config(file, "mlp_only_layers", format!("layer {bad} >= num_hidden_layers {num_layers}")));
        }
        let first_dense = hf.first_k_dense_replace.unwrap_or(0);
        if first_dense > num_layers {
            return Err(ModelError::config(file, "first_k_dense_replace", format!("{first_dense} > num_hidden_layers {num_layers}")));
        }
        // transformers: sparse iff not in mlp_only_layers and (idx + 1) % decoder_sparse_step == 0
        // (Qwen); idx >= first_k_dense_replace (GLM-4.5 / DeepSeek-V3 / LLaDA2).
        let moe_layers: Vec<usize> = (0..num_layers)
            .filter(|l| !mlp_only.contains(l) && (l + 1) % step == 0 && *l >= first_dense)
            .collect();
        let expert_intermediate_size = sized(
            need(hf.moe_intermediate_size, file, "moe_intermediate_size")?,
            limits::MAX_INTERMEDIATE,
            file,
            "moe_intermediate_size",
        )?;
        let dense_intermediate_size = match hf.intermediate_size {
            Some(i) => sized(i, limits::MAX_INTERMEDIATE, file, "intermediate_size")?,
            None if moe_layers.len() == num_layers => 0,
            None => return Err(ModelError::config(file, "intermediate_size", "missing, and the model has dense layers")),
        };
        let attention_mode = match hf.attention_mode.as_deref() {
            None if architecture == Architecture::Llada2Moe => AttentionMode::Bidirectional,
            None => AttentionMode::Causal,
            Some(m) => m.parse::<AttentionMode>().map_err(|e| ModelError::config(file, "attention_mode", e.to_string()))?,
        };
        let partial = hf
            .partial_rotary_factor
            .or_else(|| hf.rope_parameters.as_ref().and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64))
            .unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(ModelError::config(file, "partial_rotary_factor", format!("{partial} must be in (0, 1]")));
        }
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || rotary_dim % 2 != 0 {
            return Err(ModelError::config(file, "partial_rotary_factor", format!("rotates {rotary_dim} of {head_dim} dims; must be even and > 0")));
        }
        let num_shared = |n: Option<usize>, field: &str| -> Result<Option<SharedExpertConfig>> {
            Ok(match n {
                None | Some(0) => None,
                Some(n) => Some(SharedExpertConfig {
                    name: "shared_experts".into(),
                    intermediate_size: expert_intermediate_size * sized(n, limits::MAX_SHARED_EXPERTS, file, field)?,
                    gated: false,
                }),
            })
        };
        let mut router = RouterConfig::softmax_top_k(num_experts, top_k, hf.norm_topk_prob.unwrap_or(false));
        let (qkv_bias, o_bias, qk_norm, shared_expert) = match architecture {
            Architecture::Qwen3Moe => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, true, None)
            }
            Architecture::Qwen2Moe => {
                let shared = match hf.shared_expert_intermediate_size {
                    Some(0) | None => None,
                    Some(i) => Some(SharedExpertConfig {
                        name: "shared_expert".into(),
                        intermediate_size: sized(i, limits::MAX_INTERMEDIATE, file, "shared_expert_intermediate_size")?,
                        gated: true,
                    }),
                };
                (hf.qkv_bias.unwrap_or(true), false, false, shared)
            }
            Architecture::Glm4Moe => {
                router.score_function = ScoreFunction::Sigmoid;
                router.expert_bias = true;
                router.norm_topk_prob = hf.norm_topk_prob.unwrap_or(true);
                let b = hf.attention_bias.unwrap_or(false);
                (b, false, hf.use_qk_norm.unwrap_or(false), num_shared(hf.n_shared_experts, "n_shared_experts")?)
            }
            Architecture::Llada2Moe => {
                router.score_function = match hf.score_function.as_deref() {
                    None | Some("sigmoid") => ScoreFunction::Sigmoid,
                    Some("softmax") => ScoreFunction::Softmax,
                    Some(other) => return Err(ModelError::config(file, "score_function", format!("`{other}`: expected sigmoid or softmax"))),
                };
                router.expert_bias = hf.moe_router_enable_expert_bias.unwrap_or(true);
                router.norm_topk_prob = hf.norm_topk_prob.unwrap_or(true);
                // `query_key_value` has a bias iff `use_qkv_bias`, `dense` iff `use_bias`; the
                // defaults are `LLaDA2MoeConfig`'s (False, True); hub config.json files write both.
                let (qkv, o) = (hf.use_qkv_bias.unwrap_or(false), hf.use_bias.unwrap_or(true));
                (qkv, o, hf.use_qk_norm.unwrap_or(true), num_shared(hf.num_shared_experts, "num_shared_experts")?)
            }
        };
        router.n_group = hf.n_group.unwrap_or(1);
        router.topk_group = hf.topk_group.unwrap_or(1);
        router.routed_scaling_factor = hf.routed_scaling_factor.unwrap_or(1.0);
        router.strategy = match hf.routing_strategy.as_deref() {
            None | Some("token_choice") => RoutingStrategy::TokenChoice,
            Some("expert_choice") => RoutingStrategy::ExpertChoice {
                capacity_factor: hf.capacity_factor.unwrap_or(1.0),
                pool: match &hf.expert_choice_pool {
                    None => Pool::Sequence,
                    Some(p) => p.parse::<Pool>().map_err(|e| ModelError::config(file, "expert_choice_pool", e.to_string()))?,
                },
            },
            Some(other) => {
                return Err(ModelError::config(file, "routing_strategy", format!("`{other}`: expected token_choice or expert_choice")))
            }
        };
        router.validate(file, attention_mode, hf.allow_causal_expert_choice.unwrap_or(false))?;
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            num_layers,
            rms_norm_eps: limits::rms_norm_eps(hf.rms_norm_eps.unwrap_or(1e-6), file)?,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention: AttentionConfig {
                num_heads,
                num_kv_heads,
                head_dim,
                qkv_bias,
                o_bias,
                qk_norm,
                rope_theta,
                rotary_dim,
                mode: attention_mode,
            },
            dense_intermediate_size,
            moe: MoeBlockConfig { router, expert_intermediate_size, shared_expert },
            moe_layers,
            max_position_embeddings,
            raw,
        })
    }

    /// Re-validate after changing fields in code (e.g. the routing strategy from the CLI).
    pub fn validate(&self, allow_causal_pool: bool) -> Result<()> {
        self.moe.router.validate("<config>", self.attention.mode, allow_causal_pool)
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
    let from_params = match hf.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")) {
        None => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| ModelError::config(file, "rope_parameters.rope_theta", format!("{v}: not a number")))?),
    };
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
        (Some(t), _) | (None, Some(t)) => limits::rope_theta(t, file),
        (None, None) => Ok(10_000.0),
    }
}

/// `model_type`, when given beside `architectures`, must be the architecture's own.
pub(crate) fn model_type_agrees(arch: Architecture, model_type: Option<&str>, file: &str) -> Result<()> {
    let own = match arch {
        Architecture::Qwen3Moe => "qwen3_moe",
        Architecture::Qwen2Moe => "qwen2_moe",
        Architecture::Glm4Moe => "glm4_moe",
        Architecture::Llada2Moe => "llada2_moe",
    };
    match model_type {
        Some(mt) if mt != own => {
            Err(ModelError::config(file, "model_type", format!("`{mt}` disagrees with architectures = {} (model_type {own})", arch.hf_name())))
        }
        _ => Ok(()),
    }
}
