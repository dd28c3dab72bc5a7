//! What the handlers share: the engine thread's handle, the tokenizer, facts about the served
//! model, metrics — and loading a model (`default` or a checkpoint directory) with the
//! batch-invariant kernels, so served log-probabilities equal the trainer's bit for bit.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use lockstep_model::{Kernels, ModelConfig, MoeCausalLm};

use crate::error::{Result, ServerError};
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::tokenizer::Tokenizer;

/// Facts about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// the `model` name requests must use (or omit)
    pub name: String,
    pub vocab_size: usize,
    /// most tokens per sequence (prompt + completion): `max_position_embeddings`
    pub context: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_layers: Vec<usize>,
    /// fingerprint of the model config, stamped into every route trace
    pub fingerprint: u64,
    pub created: u64,
    pub cfg: ModelConfig,
}

/// Context when config.json names none.
pub const DEFAULT_CONTEXT: usize = 4096;

impl ModelInfo {
    pub fn of(name: String, cfg: &ModelConfig) -> Self {
        let context = cfg.max_position_embeddings.unwrap_or(DEFAULT_CONTEXT);
        Self {
            name,
            vocab_size: cfg.vocab_size,
            context,
            num_experts: cfg.moe.router.num_experts,
            top_k: cfg.moe.router.top_k,
            moe_layers: cfg.moe_layers.clone(),
            fingerprint: lockstep_trace::fingerprint_of(cfg.to_json_string().as_bytes()),
            created: now(),
            cfg: cfg.clone(),
        }
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub struct AppState {
    pub sched: Scheduler,
    pub tok: Arc<Tokenizer>,
    pub info: ModelInfo,
    pub metrics: Arc<Metrics>,
    /// where the served model lives (new weights are loaded there)
    pub device: Device,
    /// dtype of the served weights (new weights load in it too)
    pub dtype: DType,
    /// checkpoint tensors with no place in the config are ignored, not refused
    pub allow_unused: bool,
    /// keys, hosts, the weights root
    pub guard: Arc<crate::security::Guard>,
    /// limits, open connections, the drain flag
    pub load: Arc<crate::limits::Load>,
}

/// `default` (the embedded default, weights from `seed`, byte-level tokenizer) or a checkpoint
/// directory (its tokenizer files beside the weights); batch-invariant kernels, in `dtype`, on
/// `dev`.
pub fn load_model(spec: &str, seed: u64, dtype: DType, dev: &Device, allow_unused: bool) -> Result<(MoeCausalLm, Tokenizer)> {
    if spec == "default" {
        let m = MoeCausalLm::embedded_default(seed, dtype, dev)?;
        return Ok((ready(m, dev)?, Tokenizer::bytes()));
    }
    let dir = Path::new(spec);
    if !dir.is_dir() {
        return Err(ServerError::Config(format!("--model {spec}: not a directory (a checkpoint directory or `default`)")));
    }
    let m = load_weights(dir, dtype, dev, allow_unused)?;
    let tok = Tokenizer::from_dir(dir, m.cfg.vocab_size)?;
    Ok((m, tok))
}

/// A checkpoint's weights with the batch-invariant kernels, in `dtype`, on `dev`; tensors the
/// config has no place for refused by name unless `allow_unused`.
pub fn load_weights(dir: &Path, dtype: DType, dev: &Device, allow_unused: bool) -> Result<MoeCausalLm> {
    let opts = lockstep_model::checkpoint::LoadOptions { allow_unused, ..Default::default() };
    let m = MoeCausalLm::load_with(dir, dtype, dev, &opts)?;
    ready(m, dev)
}

/// The batch-invariant kernels; on CUDA the loading thread's stream drained, since the engine
/// thread works on its own (candle enqueues on each thread's default stream).
fn ready(mut m: MoeCausalLm, dev: &Device) -> Result<MoeCausalLm> {
    m.set_kernels(Kernels::Invariant);
    dev.synchronize().map_err(|e| ServerError::Config(format!("device {:?}: {e}", dev.location())))?;
    Ok(m)
}

/// Whether `new` can replace the served model (same architecture and shapes).
pub fn same_shape(served: &ModelConfig, new: &ModelConfig) -> bool {
    let strip = |c: &ModelConfig| ModelConfig { raw: serde_json::Value::Null, ..c.clone() };
    strip(served) == strip(new)
}
