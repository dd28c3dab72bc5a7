//! Which decoder layers are MoE layers, from a Hugging Face `config.json`.
//!
//! vLLM and SGLang capture one column per *decoder* layer (`num_hidden_layers`), dense layers
//! included (their columns stay as the capture buffer was filled: zeros); lockstep's traces
//! keep the MoE layers only, by decoder-layer id. A [`ModelLayout`] says how the two map, so an
//! import never has to guess which columns are dense and an export writes every column.
//!
//! The rule is transformers' (and lockstep-model's): layer `i` is MoE iff `i` is not in
//! `mlp_only_layers`, `(i + 1) % decoder_sparse_step == 0` (Qwen2/3-MoE), `i >=
//! first_k_dense_replace` and `i % moe_layer_freq == 0` (GLM-4.5 / DeepSeek-V3 / LLaDA2).
//! A multimodal config's `text_config` is read when the top level has no `num_hidden_layers`.

use crate::error::{Result, TraceError};
use serde_json::Value;

/// The MoE layout of a model: decoder layers, which of them route, experts and top-k.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLayout {
    /// Decoder layers (`num_hidden_layers`): the column count of vLLM / SGLang payloads.
    pub num_hidden_layers: u32,
    /// Decoder-layer ids of the MoE layers, ascending.
    pub moe_layers: Vec<u32>,
    /// Routed experts per MoE layer.
    pub num_experts: u32,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: u32,
}

fn uint(v: &Value, key: &str, file: &str) -> Result<Option<u64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| TraceError::invalid(format!("{file}: {key}"), "expected a non-negative integer")),
    }
}

impl ModelLayout {
    /// Reads `config.json` text; `file` names it in errors.
    pub fn from_config_json(bytes: &[u8], file: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_slice(bytes).map_err(|e| TraceError::json(file, format!("not JSON: {e}")))?;
        let cfg = match (root.get("num_hidden_layers"), root.get("text_config")) {
            (None, Some(t)) if t.is_object() => t,
            _ => &root,
        };
        let need = |key: &str| -> Result<u64> {
            uint(cfg, key, file)?.ok_or_else(|| TraceError::invalid(format!("{file}: {key}"), "missing"))
        };
        let n = need("num_hidden_layers")?;
        if n == 0 || n > u32::MAX as u64 {
            return Err(TraceError::invalid(format!("{file}: num_hidden_layers"), format!("{n} is not a layer count")));
        }
        let mut experts = None;
        for key in ["num_experts", "n_routed_experts", "num_local_experts"] {
            if let Some(e) = uint(cfg, key, file)? {
                match experts {
                    Some((k0, e0)) if e0 != e => {
                        return Err(TraceError::invalid(
                            format!("{file}: {key}"),
                            format!("{e} disagrees with {k0} {e0}"),
                        ))
                    }
                    _ => experts = Some((key, e)),
                }
            }
        }
        let (_, e) = experts.ok_or_else(|| {
            TraceError::invalid(
                format!("{file}: num_experts"),
                "missing (also looked for n_routed_experts, num_local_experts)",
            )
        })?;
        if e == 0 || e > crate::MAX_EXPERTS as u64 {
            return Err(TraceError::invalid(
                format!("{file}: num_experts"),
                format!("{e} not in 1..={}", crate::MAX_EXPERTS),
            ));
        }
        let k = need("num_experts_per_tok")?;
        if k == 0 || k > e {
            return Err(TraceError::invalid(format!("{file}: num_experts_per_tok"), format!("{k} not in 1..={e}")));
        }
        let step = uint(cfg, "decoder_sparse_step", file)?.unwrap_or(1).max(1);
        let freq = uint(cfg, "moe_layer_freq", file)?.unwrap_or(1).max(1);
        let first_dense = uint(cfg, "first_k_dense_replace", file)?.unwrap_or(0);
        let mlp_only: Vec<u64> = match cfg.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(Value::as_u64)
                .collect::<Option<_>>()
                .ok_or_else(|| TraceError::invalid(format!("{file}: mlp_only_layers"), "expected layer ids"))?,
            Some(_) => {
                return Err(TraceError::invalid(format!("{file}: mlp_only_layers"), "expected a list of layer ids"))
            }
        };
        let moe_layers: Vec<u32> = (0..n)
            .filter(|&l| !mlp_only.contains(&l) && (l + 1) % step == 0 && l >= first_dense && l % freq == 0)
            .map(|l| l as u32)
            .collect();
        Ok(ModelLayout { num_hidden_layers: n as u32, moe_layers, num_experts: e as u32, top_k: k as u32 })
    }

    /// Reads a `config.json` file.
    pub fn from_config_file(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TraceError::io(path.display().to_string(), e))?;
        Self::from_config_json(&bytes, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_glm_and_text_config_layouts() {
        let q = br#"{"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [2]}"#;
        let l = ModelLayout::from_config_json(q, "c").unwrap();
        assert_eq!((l.num_hidden_layers, l.moe_layers.clone(), l.num_experts, l.top_k), (4, vec![0, 1, 3], 8, 2));
        let s = br#"{"num_hidden_layers": 6, "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2}"#;
        assert_eq!(ModelLayout::from_config_json(s, "c").unwrap().moe_layers, vec![1, 3, 5]);
        let g = br#"{"text_config": {"num_hidden_layers": 5, "n_routed_experts": 160, "num_experts_per_tok": 8, "first_k_dense_replace": 3}}"#;
        let l = ModelLayout::from_config_json(g, "c").unwrap();
        assert_eq!((l.moe_layers.clone(), l.num_experts), (vec![3, 4], 160));
        let e =
            ModelLayout::from_config_json(br#"{"num_hidden_layers": 2, "num_experts": 8}"#, "cfg.json").unwrap_err();
        assert_eq!(e.field(), "cfg.json: num_experts_per_tok");
        let e = ModelLayout::from_config_json(
            br#"{"num_hidden_layers": 2, "num_experts": 8, "num_local_experts": 4, "num_experts_per_tok": 1}"#,
            "c",
        )
        .unwrap_err();
        assert_eq!(e.field(), "c: num_local_experts");
    }
}
