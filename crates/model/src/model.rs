//! The MoE causal LM (Qwen3-MoE, Qwen2-MoE): embeddings → decoder layers (attention + dense MLP
//! or MoE block) → final norm → LM head. `new(cfg, vb)` is the loader; the routing plan is an
//! argument of `forward`, keyed by decoder layer index.
//!
//! Legend: B batch rows, T slots per row, N = B*T tokens, D hidden, V vocab.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use crate::batch::Batch;
use crate::config::{AttentionMode, ModelConfig, RoutingStrategy};
use crate::error::{ModelError, Result};
use crate::moe::MoeBlock;
use crate::nn::attention::{Attention, AttentionLayout};
use crate::nn::linear::{linear_no_bias, Linear};
use crate::nn::mlp::SwiGlu;
use crate::nn::norm::RmsNorm;
use crate::nn::rope::Rope;
use crate::nn::Kernels;
use crate::routing::{Recording, RouteMode, RoutingPlan};

#[derive(Debug, Clone)]
pub enum Mlp {
    Dense(SwiGlu),
    Moe(MoeBlock),
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// The layer's MLP on y [B, T, D]: dense, or the MoE block under the plan's mode for layer
    /// `l` (its route goes into `routes` unless the mode is compute).
    pub(crate) fn mlp_forward(&self, y_BTD: &Tensor, plan: &RoutingPlan, l: usize, batch: &Batch, routes: &mut Recording) -> Result<Tensor> {
        match &self.mlp {
            Mlp::Dense(mlp) => Ok(mlp.forward(y_BTD)?),
            Mlp::Moe(block) => {
                let (b, t, d) = y_BTD.dims3()?;
                let mode = plan.mode(l);
                let (out_ND, route) = block.forward(&y_BTD.reshape((b * t, d))?, mode, l, batch)?;
                if !matches!(mode, RouteMode::Compute) {
                    routes.insert(l, route);
                }
                Ok(out_ND.reshape((b, t, d))?)
            }
        }
    }
}

/// What the layers of one forward share ([`MoeCausalLm::prepare`]).
#[derive(Debug)]
pub struct ForwardContext {
    layout: AttentionLayout,
    rope: crate::nn::rope::RopeTables,
}

/// Output of one forward.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// [B, T, V] f32
    pub logits: Tensor,
    /// Routes of the layers in record or replay mode (what was applied).
    pub routes: Recording,
}

#[derive(Debug, Clone)]
pub struct MoeCausalLm {
    pub cfg: ModelConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// None when the embeddings are tied.
    pub lm_head: Option<Linear>,
    pub(crate) rope: Rope,
    kernels: Kernels,
    device: Device,
    dtype: DType,
}

impl MoeCausalLm {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, d, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let vb = m.pp("layers").pp(l);
            let mlp = if cfg.is_moe_layer(l) {
                Mlp::Moe(MoeBlock::new(&cfg.moe, d, vb.pp("mlp"))?)
            } else {
                Mlp::Dense(SwiGlu::new(d, cfg.dense_intermediate_size, vb.pp("mlp"))?)
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
                self_attn: Attention::new(&cfg.attention, d, cfg.rms_norm_eps, vb.pp("self_attn"))?,
                post_attention_layernorm: RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
                mlp,
            });
        }
        let norm = RmsNorm::new(d, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(linear_no_bias(d, cfg.vocab_size, vb.pp("lm_head"))?)
        };
        let rope = Rope::new(cfg.attention.rope_theta, cfg.attention.rotary_dim, vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            kernels: Kernels::Autograd,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Cast every trainable parameter to `dtype` (f32 or bf16); the activations follow the
    /// parameters. What is f32 by design stays f32: the router's score-correction bias, the
    /// router scores and log-softmaxes (computed in f32 from the gate's output).
    pub fn cast(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(ModelError::batch("dtype", format!("{dtype:?}: expected f32 or bf16")));
        }
        self.map_params(|_, t| t.to_dtype(dtype))?;
        self.dtype = dtype;
        Ok(())
    }

    /// The kernels the model runs (see [`MoeCausalLm::set_kernels`]).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Switch every layer between gradient-carrying ops and candle's fused inference ops.
    pub fn set_kernels(&mut self, k: Kernels) {
        for layer in &mut self.layers {
            layer.input_layernorm.set_kernels(k);
            layer.post_attention_layernorm.set_kernels(k);
            layer.self_attn.set_kernels(k);
            match &mut layer.mlp {
                Mlp::Dense(m) => m.set_kernels(k),
                Mlp::Moe(b) => b.set_kernels(k),
            }
        }
        self.norm.set_kernels(k);
        if let Some(h) = &mut self.lm_head {
            h.set_kernels(k);
        }
        self.kernels = k;
    }

    /// Change how the model routes and attends (e.g. expert choice on a bidirectional model),
    /// keeping the weights; the new combination is validated like a config.
    pub fn set_routing(&mut self, strategy: RoutingStrategy, attention: AttentionMode, allow_causal_pool: bool) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.moe.router.strategy = strategy;
        cfg.attention.mode = attention;
        cfg.validate(allow_causal_pool)?;
        self.cfg = cfg;
        for l in self.cfg.moe_layers.clone() {
            self.moe_block_checked_mut(l)?.router.set_strategy(strategy);
        }
        Ok(())
    }

    /// The MoE block of decoder layer `layer`, if it has one.
    pub fn moe_block(&self, layer: usize) -> Option<&MoeBlock> {
        match &self.layers.get(layer)?.mlp {
            Mlp::Moe(b) => Some(b),
            Mlp::Dense(_) => None,
        }
    }

    /// The MoE block of decoder layer `layer`, if it has one (mutable).
    pub fn moe_block_mut(&mut self, layer: usize) -> Option<&mut MoeBlock> {
        match &mut self.layers.get_mut(layer)?.mlp {
            Mlp::Moe(b) => Some(b),
            Mlp::Dense(_) => None,
        }
    }

    /// The MoE block of decoder layer `layer`; a dense layer or one past the last is an error
    /// naming the layer.
    pub fn moe_block_checked(&self, layer: usize) -> Result<&MoeBlock> {
        self.moe_block(layer).ok_or_else(|| not_moe(layer, self.layers.len(), &self.cfg.moe_layers))
    }

    /// The MoE block of decoder layer `layer` (mutable); errors as [`Self::moe_block_checked`].
    pub fn moe_block_checked_mut(&mut self, layer: usize) -> Result<&mut MoeBlock> {
        let (num_layers, moe_layers) = (self.layers.len(), &self.cfg.moe_layers);
        match self.layers.get_mut(layer).map(|l| &mut l.mlp) {
            Some(Mlp::Moe(b)) => Ok(b),
            _ => Err(not_moe(layer, num_layers, moe_layers)),
        }
    }

    pub fn forward(&self, batch: &Batch, plan: &RoutingPlan) -> Result<ForwardOutput> {
        let ctx = self.prepare(batch, plan)?;
        let mut x_BTD = self.embed(batch)?;
        let mut routes = Recording::new();
        for l in 0..self.layers.len() {
            x_BTD = self.layer_forward(l, &x_BTD, &ctx, plan, batch, &mut routes)?;
        }
        let logits = self.lm_head_forward(&self.norm.forward(&x_BTD)?)?;
        Ok(ForwardOutput { logits: logits.to_dtype(DType::F32)?, routes })
    }

    /// What every layer of one forward over `batch` shares (the attention layout, the rotary
    /// tables), after checking the plan and the token ids: the first stage of
    /// [`MoeCausalLm::forward`], for callers that run the layers one by one (the trainer's
    /// staged backward and activation checkpointing).
    pub fn prepare(&self, batch: &Batch, plan: &RoutingPlan) -> Result<ForwardContext> {
        let (b, t) = batch.dims();
        plan.validate(&self.cfg, b * t)?;
        let ids = &batch.input_ids_BT;
        if let Some(&bad) = ids.flatten_all()?.to_vec1::<u32>()?.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::batch("input_ids", format!("token id {bad} >= vocab_size {}", self.cfg.vocab_size)));
        }
        let layout = match self.kernels {
            Kernels::Invariant => AttentionLayout::Keys(std::sync::Arc::new(batch.key_layout(self.cfg.attention.mode)?)),
            _ => batch.attention_layout(self.cfg.attention.mode, &self.device)?,
        };
        let rope = self.rope.tables(batch.positions(), b, t, self.dtype)?;
        Ok(ForwardContext { layout, rope })
    }

    /// The token embeddings x [B, T, D] of `batch` (ids checked by [`MoeCausalLm::prepare`]).
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(&batch.input_ids_BT)?)
    }

    /// Decoder layer `l` on x [B, T, D] → [B, T, D]; its route goes into `routes` unless the
    /// plan computes layer `l` freely.
    pub fn layer_forward(&self, l: usize, x_BTD: &Tensor, ctx: &ForwardContext, plan: &RoutingPlan, batch: &Batch, routes: &mut Recording) -> Result<Tensor> {
        let layer = self.layers.get(l).ok_or_else(|| ModelError::Layer { layer: l, msg: format!("the model has {} layers", self.layers.len()) })?;
        let h = layer.self_attn.forward(&layer.input_layernorm.forward(x_BTD)?, &ctx.rope, &ctx.layout)?;
        let h_BTD = (x_BTD + h)?;
        let y_BTD = layer.post_attention_layernorm.forward(&h_BTD)?;
        let out_BTD = layer.mlp_forward(&y_BTD, plan, l, batch, routes)?;
        Ok((h_BTD + out_BTD)?)
    }

    /// The last layer's output [.., D] → logits [.., V] in the model's dtype: the final norm,
    /// then the LM head. Row by row, so it may run on any subset of the token rows.
    pub fn head_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head_forward(&self.norm.forward(x)?)?)
    }

    /// Final hidden states [B, T, D] → logits [B, T, V] (tied or untied head).
    pub(crate) fn lm_head_forward(&self, x_BTD: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(x_BTD),
            None if self.kernels == Kernels::Invariant => crate::nn::invariant::matmul_nt(x_BTD, self.embed_tokens.embeddings()),
            None => x_BTD.broadcast_matmul(&self.embed_tokens.embeddings().t()?),
        }
    }
}

/// The error for a layer without an MoE block.
fn not_moe(layer: usize, num_layers: usize, moe_layers: &[usize]) -> ModelError {
    let msg = if layer >= num_layers {
        format!("not an MoE layer: the model has {num_layers} layers")
    } else {
        format!("not an MoE layer: layer {layer} is dense; MoE layers are {moe_layers:?}")
    };
    ModelError::Layer { layer, msg }
}
