//! Hugging Face checkpoints: a directory with `config.json` and `model.safetensors` or a sharded
//! `model.safetensors.index.json`; f32 / bf16 / f16 weights, converted to the requested dtype.
//! Also the list of tensors a config implies (names as on the hub, one tensor per expert).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::MoeCausalLm;

/// The safetensors files of a checkpoint directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let file = index.display().to_string();
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::config(&file, "<file>", e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::config(&file, "<json>", e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::config(&file, "weight_map", "missing or not an object"))?;
        let mut files = BTreeSet::new();
        for (tensor, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| ModelError::config(&file, &format!("weight_map.{tensor}"), "not a file name"))?;
            files.insert(f.to_string());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::WeightFile {
        path: dir.to_path_buf(),
        msg: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// Open (mmap) the weight files, checking each header so errors name the broken file.
pub fn open_weights(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    for f in files {
        // SAFETY: the file is mapped read-only; lockstep never writes a checkpoint in place
        // (saves go to a temp file and are renamed).
        unsafe { MmapedSafetensors::new(f) }
            .map_err(|e| ModelError::WeightFile { path: f.clone(), msg: strip_backtrace(&e) })?;
    }
    // SAFETY: as above.
    unsafe { MmapedSafetensors::multi(files) }
        .map_err(|e| ModelError::WeightFile { path: files[0].clone(), msg: strip_backtrace(&e) })
}

fn strip_backtrace(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Map a loader error to one that names the checkpoint directory and the tensor.
pub(crate) fn tensor_error(dir: &Path, e: candle_core::Error) -> ModelError {
    let inner = match &e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.as_ref(),
        other => other,
    };
    match inner {
        candle_core::Error::CannotFindTensor { path } => {
            ModelError::Tensor { dir: dir.into(), tensor: path.clone(), msg: "missing from the checkpoint".into() }
        }
        candle_core::Error::UnexpectedShape { msg, expected, got } => ModelError::Tensor {
            dir: dir.into(),
            tensor: msg.trim_start_matches("shape mismatch for ").to_string(),
            msg: format!("shape {got:?}, the config implies {expected:?}"),
        },
        _ => ModelError::Tensor { dir: dir.into(), tensor: "?".into(), msg: strip_backtrace(&e) },
    }
}

impl MoeCausalLm {
    /// Load `config.json` + safetensors from a checkpoint directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        let st = open_weights(&files)?;
        let vb = VarBuilder::from_backend(Box::new(st), dtype, device.clone());
        MoeCausalLm::new(&cfg, vb).map_err(|e| tensor_error(dir, e))
    }
}

/// Every tensor a config implies, with its shape, under hub names (one tensor per expert).
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let a = &cfg.attention;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, d])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let attn = format!("{p}.self_attn");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        for (name, rows) in [("q_proj", a.num_heads), ("k_proj", a.num_kv_heads), ("v_proj", a.num_kv_heads)] {
            out.push((format!("{attn}.{name}.weight"), vec![rows * a.head_dim, d]));
            if a.qkv_bias {
                out.push((format!("{attn}.{name}.bias"), vec![rows * a.head_dim]));
            }
        }
        out.push((format!("{attn}.o_proj.weight"), vec![d, a.num_heads * a.head_dim]));
        if a.o_bias {
            out.push((format!("{attn}.o_proj.bias"), vec![d]));
        }
        if a.qk_norm {
            out.push((format!("{attn}.q_norm.weight"), vec![a.head_dim]));
            out.push((format!("{attn}.k_norm.weight"), vec![a.head_dim]));
        }
        let mlp = format!("{p}.mlp");
        let swiglu = |out: &mut Vec<(String, Vec<usize>)>, prefix: &str, f: usize| {
            out.push((format!("{prefix}.gate_proj.weight"), vec![f, d]));
            out.push((format!("{prefix}.up_proj.weight"), vec![f, d]));
            out.push((format!("{prefix}.down_proj.weight"), vec![d, f]));
        };
        if cfg.is_moe_layer(l) {
            let m = &cfg.moe;
            out.push((format!("{mlp}.gate.weight"), vec![m.router.num_experts, d]));
            if m.router.expert_bias {
                out.push((format!("{mlp}.gate.e_score_correction_bias"), vec![m.router.num_experts]));
            }
            for e in 0..m.router.num_experts {
                swiglu(&mut out, &format!("{mlp}.experts.{e}"), m.expert_intermediate_size);
            }
            if let Some(s) = &m.shared_expert {
                swiglu(&mut out, &format!("{mlp}.{}", s.name), s.intermediate_size);
                if s.gated {
                    out.push((format!("{mlp}.shared_expert_gate.weight"), vec![1, d]));
                }
            }
        } else {
            swiglu(&mut out, &mlp, cfg.dense_intermediate_size);
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    out
}

impl MoeCausalLm {
    /// Every tensor under its checkpoint (hub) name: experts split back into one tensor per
    /// expert, expert biases included — the layout `load` reads and transformers loads.
    pub fn hub_tensors(&self) -> Result<Vec<(String, candle_core::Tensor)>> {
        let mut out = Vec::new();
        for (name, t) in self.named_params()? {
            if let Some(p) = name.strip_suffix(".experts.gate_up_proj") {
                let (e, two_f, _) = t.dims3()?;
                let f = two_f / 2;
                for x in 0..e {
                    let w = t.get(x)?;
                    out.push((format!("{p}.experts.{x}.gate_proj.weight"), w.narrow(0, 0, f)?.contiguous()?));
                    out.push((format!("{p}.experts.{x}.up_proj.weight"), w.narrow(0, f, f)?.contiguous()?));
                }
            } else if let Some(p) = name.strip_suffix(".experts.down_proj") {
                for x in 0..t.dim(0)? {
                    out.push((format!("{p}.experts.{x}.down_proj.weight"), t.get(x)?.contiguous()?));
                }
            } else {
                out.push((name, t));
            }
        }
        for &l in &self.cfg.moe_layers {
            if let Some(b) = &self.moe_block(l).and_then(|b| b.router.expert_bias.clone()) {
                out.push((format!("model.layers.{l}.mlp.gate.e_score_correction_bias"), b.clone()));
            }
        }
        Ok(out)
    }

    /// Save as a Hugging Face checkpoint directory (`config.json` + `model.safetensors`),
    /// atomically: written into a temporary sibling directory, then renamed over `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let files = self.checkpoint_files()?;
        write_dir_atomically(dir, |tmp| files.write(tmp))
    }

    /// The checkpoint's contents in memory, to write into a directory (with other files).
    pub fn checkpoint_files(&self) -> Result<CheckpointFiles> {
        let tensors = self
            .hub_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.detach().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        Ok(CheckpointFiles { config_json: self.cfg.to_json_string(), tensors })
    }
}

/// `config.json` text and hub-named tensors of a model.
pub struct CheckpointFiles {
    pub config_json: String,
    pub tensors: std::collections::HashMap<String, candle_core::Tensor>,
}

impl CheckpointFiles {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("config.json"), &self.config_json)?;
        candle_core::safetensors::save(&self.tensors, dir.join("model.safetensors")).map_err(std::io::Error::other)
    }
}

/// Fill a fresh temporary sibling of `dir` with `fill`, then swap it in with renames, so a
/// reader never sees a half-written checkpoint.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let io = |e: std::io::Error| ModelError::WeightFile { path: dir.to_path_buf(), msg: e.to_string() };
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "checkpoint".into());
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    fill(&tmp).map_err(io)?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io)?;
    }
    std::fs::rename(&tmp, dir).map_err(io)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
