//! Hugging Face checkpoints: a directory with `config.json` and `model.safetensors` or a sharded
//! `model.safetensors.index.json`; f32 / bf16 / f16 weights, converted to the requested dtype.
//! Also the list of tensors a config implies (names as on the hub, one tensor per expert).
//!
//! Names: the model asks for Qwen-style names (`self_attn.q_proj`, `embed_tokens`, ...), the
//! names of Qwen2/3-MoE and GLM-4.5 checkpoints. LLaDA2-MoE checkpoints use their own
//! ([`llada2_source`]); `load` maps them (splitting the fused QKV) and `save` writes them.
//!
//! Legend: L decoder layer, D hidden, H query heads, G kv heads, Dh head dim.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
pub use crate::manifest::{write_dir_atomically, DirWriter};
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

/// How [`MoeCausalLm::load_with`] treats a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Accept tensors the config has no place for (ignored) instead of refusing the
    /// checkpoint — an `lm_head.weight` beside `tie_word_embeddings: true`, layers past
    /// `num_hidden_layers`, leftovers of another architecture. Default false.
    pub allow_unused: bool,
    /// Check the tensor files against `lockstep-manifest.json` when there is one
    /// ([`crate::manifest::verify`]). Default true.
    pub verify_manifest: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { allow_unused: false, verify_manifest: true }
    }
}

/// The tensors of `names` (a checkpoint's) that `cfg` has no place for, each with why. Layers
/// `num_hidden_layers..num_hidden_layers + num_nextn_predict_layers` (GLM-4.5 / DeepSeek-V3's
/// multi-token-prediction layers, which lockstep does not run) are expected and not listed.
/// `llada2_names`: the checkpoint uses LLaDA2's names ([`llada2_source`]).
pub fn unused_tensors<'a>(cfg: &ModelConfig, names: impl IntoIterator<Item = &'a str>, llada2_names: bool) -> Vec<(String, String)> {
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for (name, _) in tensor_specs(cfg) {
        if llada2_names {
            match llada2_source(cfg, &name) {
                Llada2Source::Renamed(n) | Llada2Source::Qkv { fused: n, .. } => expected.insert(n),
            };
        } else {
            expected.insert(name);
        }
    }
    let mtp = cfg.raw.get("num_nextn_predict_layers").and_then(serde_json::Value::as_u64).unwrap_or(0) as usize;
    let mut out = Vec::new();
    for name in names {
        if expected.contains(name) {
            continue;
        }
        let layer = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
        let why = match layer {
            Some(l) if l >= cfg.num_layers && l < cfg.num_layers + mtp => continue,
            Some(l) if l >= cfg.num_layers => format!("layer {l} is beyond num_hidden_layers = {}", cfg.num_layers),
            _ if name == "lm_head.weight" && cfg.tie_word_embeddings => {
                "present, but config.json sets tie_word_embeddings = true (the output projection is the embedding \
                 matrix, so this tensor would be silently ignored): set tie_word_embeddings = false, or load with \
                 allow_unused"
                    .to_string()
            }
            _ => "in the weights but not in the model the config describes".to_string(),
        };
        out.push((name.to_string(), why));
    }
    out.sort();
    out
}

impl MoeCausalLm {
    /// Load `config.json` + safetensors from a checkpoint directory, strictly
    /// ([`LoadOptions::default`]): see [`MoeCausalLm::load_with`].
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, dtype, device, &LoadOptions::default())
    }

    /// Load a checkpoint directory. Before any tensor is made: `config.json` is validated (sizes
    /// bounded, `crate::validate`), the weights' bytes in `dtype` are checked against the memory
    /// `device` has ([`ModelConfig::check_fits`]), the tensor files against the manifest when
    /// there is one, and every tensor of the files must have a place in the config (unless
    /// `opts.allow_unused`). An LLaDA2-MoE config whose weights hold
    /// `model.word_embeddings.weight` is read under LLaDA2's names ([`llada2_source`]); otherwise
    /// under the Qwen-style names. Every weight must be finite.
    pub fn load_with(dir: &Path, dtype: DType, device: &Device, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = ModelConfig::from_file(&cfg_path)?;
        cfg.check_fits(&cfg_path.display().to_string(), dtype, device)?;
        let files = weight_files(dir)?;
        if opts.verify_manifest {
            crate::manifest::verify(dir, &files)?;
        }
        let st = open_weights(&files)?;
        let llada2_names = cfg.architecture == Architecture::Llada2Moe && st.get(LLADA2_EMBED).is_ok();
        let tensors = st.tensors();
        // weights are floating point: integers would be converted to floats silently
        if let Some((name, view)) = tensors.iter().find(|(_, v)| !matches!(v.dtype(), safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F64)) {
            return Err(ModelError::Tensor { dir: dir.to_path_buf(), tensor: name.clone(), msg: format!("stored as {:?}: weights must be f32, bf16 or f16", view.dtype()) });
        }
        if !opts.allow_unused {
            let names = tensors.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
            let unused = unused_tensors(&cfg, names.iter().map(String::as_str), llada2_names);
            if let Some((tensor, why)) = unused.first() {
                let more = if unused.len() > 1 { format!(" ({} unused tensors in all)", unused.len()) } else { String::new() };
                return Err(ModelError::Tensor { dir: dir.to_path_buf(), tensor: tensor.clone(), msg: format!("{why}{more}") });
            }
        }
        let backend: Box<dyn SimpleBackend> = if llada2_names {
            Box::new(Llada2Names { inner: Box::new(st), cfg: cfg.clone() })
        } else {
            Box::new(st)
        };
        let vb = VarBuilder::from_backend(backend, dtype, device.clone());
        let model = MoeCausalLm::new(&cfg, vb).map_err(|e| tensor_error(dir, e))?;
        model.check_finite().map_err(|(tensor, msg)| ModelError::Tensor { dir: dir.to_path_buf(), tensor, msg })?;
        Ok(model)
    }

    /// Every weight finite (a NaN or an infinity in a checkpoint would make every forward
    /// silently wrong): the first offending tensor's name, else Ok. One reduction per tensor
    /// on its device (the sum of squares: NaN / inf — or values too large to square in f32 —
    /// make it non-finite).
    pub fn check_finite(&self) -> std::result::Result<(), (String, String)> {
        let params = self.named_params().map_err(|e| ("(parameters)".to_string(), e.to_string()))?;
        for (name, t) in params {
            let s = t
                .to_dtype(DType::F32)
                .and_then(|t| t.sqr())
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .map_err(|e| (name.clone(), e.to_string()))?;
            if !s.is_finite() {
                return Err((name, "holds NaN or infinite values (or values too large to square in f32); refusing to serve or train on it".into()));
            }
        }
        Ok(())
    }
}

/// LLaDA2's name of the token embeddings; its presence marks an LLaDA2-named checkpoint.
pub const LLADA2_EMBED: &str = "model.word_embeddings.weight";

/// Where a tensor the model asks for (Qwen-style name) lies in an LLaDA2-MoE checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Llada2Source {
    /// The same tensor under this name (often the same name).
    Renamed(String),
    /// Rows `rows` of the fused `attention.query_key_value.{weight,bias}` (`total` rows =
    /// (H + 2G)·Dh); `part` 0, 1, 2 = q, k, v.
    Qkv { fused: String, part: usize, rows: Range<usize>, total: usize },
}

/// LLaDA2-MoE's tensor names: the state-dict names of `LLaDA2MoeModelLM` in
/// `modeling_llada2_moe.py`, the `trust_remote_code` modeling file that
/// `inclusionAI/LLaDA2.0-mini-preview` ships beside its 7-shard `model.safetensors.index.json`
/// (hub commit d61c06e, "First model version"); `save_pretrained` writes exactly these names into
/// the weight_map. (The index file itself was not reachable from here; the modeling file was.)
/// Read from the copy in GitHub yks23/Information-Gain-Sampler,
/// `dllm/dllm/pipelines/llada2/models/modeling_llada2_moe.py` (commit f1cb636), classes
/// `LLaDA2MoeModel` (`word_embeddings`, `layers`, `norm`), `LLaDA2MoeDecoderLayer` (`attention`,
/// `mlp`, `input_layernorm`, `post_attention_layernorm`), `LLaDA2MoeAttention`
/// (`query_key_value` with bias iff `use_qkv_bias`, `query_layernorm` / `key_layernorm` iff
/// `use_qk_norm`, `dense` with bias iff `use_bias`), `LLaDA2MoeSparseMoeBlock` (`gate`,
/// `experts.{e}`, `shared_experts`), `LLaDA2MoeGate` (`weight`, buffer `expert_bias`),
/// `LLaDA2MoeMLP` (`gate_proj`, `up_proj`, `down_proj`):
///
/// | asked for (Qwen-style)                               | LLaDA2 checkpoint                                       |
/// |------------------------------------------------------|---------------------------------------------------------|
/// | `model.embed_tokens.weight`                          | `model.word_embeddings.weight`                          |
/// | `model.layers.L.self_attn.{q,k,v}_proj.{weight,bias}`| rows of `model.layers.L.attention.query_key_value.{weight,bias}` |
/// | `model.layers.L.self_attn.o_proj.{weight,bias}`      | `model.layers.L.attention.dense.{weight,bias}`          |
/// | `model.layers.L.self_attn.{q,k}_norm.weight`         | `model.layers.L.attention.{query,key}_layernorm.weight` |
/// | `model.layers.L.mlp.gate.e_score_correction_bias`    | `model.layers.L.mlp.gate.expert_bias`                   |
/// | anything else (norms, `mlp.gate.weight`, `mlp.experts.E.*`, `mlp.shared_experts.*`, dense `mlp.*`, `model.norm`, `lm_head`) | the same name |
///
/// The fused QKV is `qkv.view(.., H + 2G, Dh).split([H, G, G])`: rows [0, H·Dh) are q,
/// [H·Dh, (H + G)·Dh) k, the rest v (the bias alike).
pub fn llada2_source(cfg: &ModelConfig, name: &str) -> Llada2Source {
    if name == "model.embed_tokens.weight" {
        return Llada2Source::Renamed(LLADA2_EMBED.to_string());
    }
    let Some((layer, tail)) = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) else {
        return Llada2Source::Renamed(name.to_string());
    };
    let p = format!("model.layers.{layer}");
    let a = &cfg.attention;
    let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let qkv = |part: usize, suffix: &str| {
        let rows = match part {
            0 => 0..q,
            1 => q..q + kv,
            _ => q + kv..q + 2 * kv,
        };
        Llada2Source::Qkv { fused: format!("{p}.attention.query_key_value.{suffix}"), part, rows, total: q + 2 * kv }
    };
    match tail {
        "self_attn.q_proj.weight" => qkv(0, "weight"),
        "self_attn.k_proj.weight" => qkv(1, "weight"),
        "self_attn.v_proj.weight" => qkv(2, "weight"),
        "self_attn.q_proj.bias" => qkv(0, "bias"),
        "self_attn.k_proj.bias" => qkv(1, "bias"),
        "self_attn.v_proj.bias" => qkv(2, "bias"),
        "self_attn.o_proj.weight" => Llada2Source::Renamed(format!("{p}.attention.dense.weight")),
        "self_attn.o_proj.bias" => Llada2Source::Renamed(format!("{p}.attention.dense.bias")),
        "self_attn.q_norm.weight" => Llada2Source::Renamed(format!("{p}.attention.query_layernorm.weight")),
        "self_attn.k_norm.weight" => Llada2Source::Renamed(format!("{p}.attention.key_layernorm.weight")),
        "mlp.gate.e_score_correction_bias" => Llada2Source::Renamed(format!("{p}.mlp.gate.expert_bias")),
        _ => Llada2Source::Renamed(name.to_string()),
    }
}

/// Serves the Qwen-style names the model asks for from an LLaDA2-named checkpoint
/// ([`llada2_source`]), slicing q / k / v out of the fused QKV. Errors name the checkpoint's
/// tensor (and, for the fused QKV, the full shape the config implies).
struct Llada2Names {
    inner: Box<dyn SimpleBackend>,
    cfg: ModelConfig,
}

impl Llada2Names {
    /// `name`'s tensor; the fused QKV is checked against `want` (the part's shape) first.
    fn fetch(&self, name: &str, want: Option<&Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match llada2_source(&self.cfg, name) {
            Llada2Source::Renamed(src) => self.inner.get_unchecked(&src, dtype, dev),
            Llada2Source::Qkv { fused, rows, total, .. } => {
                let t = self.inner.get_unchecked(&fused, dtype, dev)?;
                let mut full = want.map(|s| s.dims().to_vec()).unwrap_or_else(|| t.dims().to_vec());
                if let Some(d0) = full.first_mut() {
                    *d0 = total;
                }
                if t.dims() != full.as_slice() {
                    return Err(candle_core::Error::UnexpectedShape {
                        msg: format!("shape mismatch for {fused}"),
                        expected: Shape::from(full),
                        got: t.shape().clone(),
                    });
                }
                t.narrow(0, rows.start, rows.len())?.contiguous()
            }
        }
    }
}

impl SimpleBackend for Llada2Names {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.fetch(name, Some(&s), dtype, dev)?;
        if t.shape() != &s {
            let src = match llada2_source(&self.cfg, name) {
                Llada2Source::Renamed(n) | Llada2Source::Qkv { fused: n, .. } => n,
            };
            return Err(candle_core::Error::UnexpectedShape { msg: format!("shape mismatch for {src}"), expected: s, got: t.shape().clone() });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match llada2_source(&self.cfg, name) {
            Llada2Source::Renamed(n) | Llada2Source::Qkv { fused: n, .. } => self.inner.contains_tensor(&n),
        }
    }
}

/// Qwen-style named tensors → LLaDA2's names ([`llada2_source`]), q / k / v of each layer fused
/// into `attention.query_key_value` (rows q, k, v).
pub fn to_llada2_names(cfg: &ModelConfig, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(tensors.len());
    let mut parts: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    for (name, t) in tensors {
        match llada2_source(cfg, &name) {
            Llada2Source::Renamed(n) => out.push((n, t)),
            Llada2Source::Qkv { fused, part, rows, .. } => {
                if t.dim(0)? != rows.len() {
                    return Err(ModelError::Tensor {
                        dir: PathBuf::from("<in-memory model>"),
                        tensor: name,
                        msg: format!("{} rows, the config implies {}", t.dim(0)?, rows.len()),
                    });
                }
                let slot = parts.entry(fused.clone()).or_default();
                slot[part] = Some(t);
                if let [Some(q), Some(k), Some(v)] = slot {
                    out.push((fused.clone(), Tensor::cat(&[&*q, &*k, &*v], 0)?));
                    parts.remove(&fused);
                }
            }
        }
    }
    if let Some(fused) = parts.keys().next() {
        return Err(ModelError::Tensor { dir: PathBuf::from("<in-memory model>"), tensor: fused.clone(), msg: "q, k and v are not all present".into() });
    }
    Ok(out)
}

/// Every tensor a config implies, with its shape, under the Qwen-style hub names the model asks
/// for (one tensor per expert; LLaDA2's own names: [`llada2_source`]).
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
    /// expert, expert biases included — the layout `load` reads and transformers loads. An
    /// LLaDA2-MoE model uses LLaDA2's names ([`to_llada2_names`]: fused QKV, `attention.dense`,
    /// `word_embeddings`, `gate.expert_bias`), as its `modeling_llada2_moe.py` expects.
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
        if self.cfg.architecture == Architecture::Llada2Moe {
            return to_llada2_names(&self.cfg, out);
        }
        Ok(out)
    }

    /// Save as a Hugging Face checkpoint directory (`config.json` + `model.safetensors`),
    /// atomically: written into a temporary sibling directory, then renamed over `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let files = self.checkpoint_files()?;
        write_dir_atomically(dir, |w| files.write_into(w))
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
    /// Write `config.json` and `model.safetensors` into a directory directly (no manifest; see
    /// [`CheckpointFiles::write_into`] for a checkpoint save).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("config.json"), &self.config_json)?;
        candle_core::safetensors::save(&self.tensors, dir.join("model.safetensors")).map_err(std::io::Error::other)
    }

    /// Write `config.json` and `model.safetensors` through a save in progress (each one
    /// operation of its [`crate::manifest::CheckpointFs`]).
    pub fn write_into(&self, w: &DirWriter) -> std::io::Result<()> {
        w.write_bytes("config.json", self.config_json.as_bytes())?;
        w.write_tensors("model.safetensors", &self.tensors)
    }
}
