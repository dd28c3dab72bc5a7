//! Incremental decoding: a KV cache per sequence and a forward over one packed row of *new*
//! tokens (prompt chunks and/or one decode token per sequence) that attends to each sequence's
//! cache. With `Kernels::Invariant` its logits and routes equal, bit for bit, those of a full
//! forward over the whole sequences (the trainer's view): the engine's lockstep property.

use candle_core::{DType, Module};

use crate::batch::Batch;
use crate::config::{AttentionMode, Pool, RoutingStrategy};
use crate::error::{ModelError, Result};
use crate::model::{ForwardOutput, MoeCausalLm};
use crate::nn::attention::LayerKv;
use crate::routing::{Recording, RoutingPlan};

/// The cached keys / values of one sequence, every layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl MoeCausalLm {
    /// Whether the model can be generated token by token over a KV cache: causal attention, and
    /// each token's route independent of later tokens — token choice, or expert choice over
    /// one-token pools (`block:1`). A wider expert-choice pool is refused: there a token's experts
    /// depend on the tokens after it. Errors name the config field.
    pub fn check_incremental(&self) -> Result<()> {
        let mode = self.cfg.attention.mode;
        if mode != AttentionMode::Causal {
            return Err(ModelError::batch("attention_mode", format!("{mode:?}: a KV cache (token-by-token generation) needs causal attention")));
        }
        match self.cfg.moe.router.strategy {
            RoutingStrategy::TokenChoice | RoutingStrategy::ExpertChoice { pool: Pool::Block(1), .. } => Ok(()),
            RoutingStrategy::ExpertChoice { pool, .. } => Err(ModelError::batch(
                "expert_choice_pool",
                format!(
                    "{pool:?}: expert choice over a pool wider than one token picks a token's experts by the \
                     tokens after it, so it cannot be generated token by token; use pool block:1 (per token, causal)"
                ),
            )),
        }
    }

    /// Forward new tokens: `step` is a packed row whose i-th sequence continues `caches[i]`
    /// (positions must continue the cache: `caches[i].len()..`). Models that pass
    /// [`MoeCausalLm::check_incremental`] only.
    pub fn forward_cached(&self, step: &Batch, caches: &mut [&mut KvCache], plan: &RoutingPlan) -> Result<ForwardOutput> {
        self.check_incremental()?;
        let (b, t) = step.dims();
        if b != 1 {
            return Err(ModelError::batch("step", "one packed row of new tokens expected"));
        }
        // runs of consecutive slots of one sequence
        let seg = step.segments();
        let mut runs = Vec::new();
        let mut s = 0;
        while s < t {
            let mut e = s + 1;
            while e < t && seg[e] == seg[s] {
                e += 1;
            }
            if seg[s] == 0 {
                return Err(ModelError::batch("step", "padding slots are not allowed in an incremental step"));
            }
            runs.push((s, e - s));
            s = e;
        }
        if runs.len() != caches.len() {
            return Err(ModelError::batch("caches", format!("{} caches for {} sequences in the step", caches.len(), runs.len())));
        }
        for (i, (&(start, len), c)) in runs.iter().zip(caches.iter()).enumerate() {
            let want: Vec<u32> = (c.len as u32..(c.len + len) as u32).collect();
            if step.positions()[start..start + len] != want[..] {
                return Err(ModelError::batch("position_ids", format!("sequence {i}: positions must continue its cache at {}", c.len)));
            }
        }
        plan.validate(&self.cfg, t)?;
        for c in caches.iter_mut() {
            if c.layers.is_empty() {
                c.layers = vec![LayerKv::default(); self.cfg.num_layers];
            }
        }
        let rope = self.rope.tables(step.positions(), 1, t, self.dtype())?;
        let mut x_BTD = self.embed_tokens.forward(&step.input_ids_BT)?;
        let mut routes = Recording::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut kv: Vec<&mut LayerKv> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            let h = layer.self_attn.forward_cached(&layer.input_layernorm.forward(&x_BTD)?, &rope, &runs, &mut kv)?;
            let h_BTD = (x_BTD + h)?;
            let y_BTD = layer.post_attention_layernorm.forward(&h_BTD)?;
            let out_BTD = layer.mlp_forward(&y_BTD, plan, l, step, &mut routes)?;
            x_BTD = (h_BTD + out_BTD)?;
        }
        for (c, &(_, len)) in caches.iter_mut().zip(&runs) {
            c.len += len;
        }
        let logits = self.lm_head_forward(&self.norm.forward(&x_BTD)?)?;
        Ok(ForwardOutput { logits: logits.to_dtype(DType::F32)?, routes })
    }
}
