//! The paged KV cache: per layer one preallocated key pool and one value pool of `num_blocks`
//! fixed-size blocks of `block_size` token rows ([num_blocks · block_size, G, Dh]), and a
//! forward over one packed row of *new* tokens (prompt chunks and / or one decode token per
//! sequence) whose sequences each bring a block table. The new tokens' keys and values are
//! written into their slots, then every new token attends to its sequence's keys through the
//! table — one attention launch per layer for the whole step, batch-invariant: its logits and
//! routes equal, bit for bit, those of a full forward over the whole sequences (the trainer's
//! view under `Kernels::Invariant`), whatever the batch and wherever the blocks lie.
//!
//! Which blocks a sequence owns, sharing and freeing are the engine's (`lockstep_engine`'s
//! block manager); this module only checks that a step's tables cover its tokens and that no
//! two new tokens write one slot.
//!
//! Legend: T new tokens, G kv heads, Dh head dim, R = num_blocks · block_size pool rows.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use crate::batch::Batch;
use crate::config::{AttentionMode, ModelConfig, Pool, RoutingStrategy};
use crate::error::{ModelError, Result};
use crate::model::{ForwardOutput, MoeCausalLm};
use crate::nn::kv_write::write_rows;
use crate::nn::norm::RmsNorm;
use crate::nn::varlen::KeyLayout;
use crate::routing::{Recording, RoutingPlan};

/// Every layer's key and value pools.
#[derive(Debug, Clone)]
pub struct KvPool {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    dtype: DType,
}

/// One sequence of a paged step: its block table (pool block ids in order, covering its cached
/// tokens and the step's new ones) and how many of its tokens the pool already holds.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    pub blocks: &'a [u32],
    pub cached: usize,
}

impl KvPool {
    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(cfg: &ModelConfig, dtype: DType, block_size: usize) -> usize {
        2 * cfg.num_layers * block_size * cfg.attention.num_kv_heads * cfg.attention.head_dim * dtype.size_in_bytes()
    }

    /// Zeroed pools for `model` (its dtype and device).
    pub fn new(model: &MoeCausalLm, num_blocks: usize, block_size: usize) -> Result<Self> {
        Self::with(&model.cfg, num_blocks, block_size, model.dtype(), model.device())
    }

    pub fn with(cfg: &ModelConfig, num_blocks: usize, block_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::batch("kv_pool", format!("{num_blocks} blocks of {block_size} tokens: both must be >= 1")));
        }
        let rows = num_blocks.checked_mul(block_size).filter(|&r| r <= u32::MAX as usize).ok_or_else(|| {
            ModelError::batch("kv_pool", format!("{num_blocks} blocks of {block_size} tokens exceed 2^32 rows"))
        })?;
        let shape = (rows, cfg.attention.num_kv_heads, cfg.attention.head_dim);
        let pools = |_| Tensor::zeros(shape, dtype, device);
        Ok(Self {
            k: (0..cfg.num_layers).map(pools).collect::<candle_core::Result<_>>()?,
            v: (0..cfg.num_layers).map(pools).collect::<candle_core::Result<_>>()?,
            block_size,
            num_blocks,
            dtype,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Copy `n` tokens' keys and values from block `src` to block `dst`, every layer (a
    /// shared partial block made private before a sequence writes into it).
    pub fn copy_block(&mut self, src: u32, dst: u32, n: usize) -> Result<()> {
        let bs = self.block_size;
        let check = |b: u32| if (b as usize) < self.num_blocks { Ok(()) } else { Err(ModelError::batch("blocks", format!("block {b} outside a pool of {}", self.num_blocks))) };
        check(src)?;
        check(dst)?;
        if n > bs {
            return Err(ModelError::batch("blocks", format!("{n} rows of a {bs}-token block")));
        }
        if n == 0 || src == dst {
            return Ok(());
        }
        let dev = self.k[0].device().clone();
        let slots = Tensor::from_vec((0..n).map(|i| (dst as usize * bs + i) as u32).collect::<Vec<_>>(), n, &dev)?;
        for p in self.k.iter().chain(&self.v) {
            let rows = p.narrow(0, src as usize * bs, n)?.contiguous()?;
            write_rows(p, &rows, &slots)?;
        }
        Ok(())
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

    /// Forward new tokens over the paged cache: `step` is a packed row whose i-th sequence
    /// continues `seqs[i]` (positions `seqs[i].cached..`, its table covering them). Models that
    /// pass [`MoeCausalLm::check_incremental`] only; the pool must be this model's shape. The
    /// logits are those of each sequence's last new token only, [1, S, V] (where it samples);
    /// the routes cover every new token.
    pub fn forward_paged(&self, step: &Batch, seqs: &[PagedSeq], pool: &mut KvPool, plan: &RoutingPlan) -> Result<ForwardOutput> {
        self.check_incremental()?;
        let (b, t) = step.dims();
        if b != 1 {
            return Err(ModelError::batch("step", "one packed row of new tokens expected"));
        }
        if pool.k.len() != self.cfg.num_layers || pool.dtype != self.dtype() || pool.k[0].dims()[1..] != [self.cfg.attention.num_kv_heads, self.cfg.attention.head_dim] {
            return Err(ModelError::batch("kv_pool", format!("a pool of {} layers {:?} {:?} does not fit the model", pool.k.len(), pool.k[0].dims(), pool.dtype)));
        }
        let runs = runs_of(step)?;
        if runs.len() != seqs.len() {
            return Err(ModelError::batch("seqs", format!("{} block tables for {} sequences in the step", seqs.len(), runs.len())));
        }
        let bs = pool.block_size;
        let (mut table, mut slots, mut q_start, mut q_keys) = (Vec::new(), Vec::with_capacity(t), Vec::with_capacity(t), Vec::with_capacity(t));
        for (i, (&(start, len), s)) in runs.iter().zip(seqs).enumerate() {
            let want: Vec<u32> = (s.cached as u32..(s.cached + len) as u32).collect();
            if step.positions()[start..start + len] != want[..] {
                return Err(ModelError::batch("position_ids", format!("sequence {i}: positions must continue its cache at {}", s.cached)));
            }
            if s.blocks.len() * bs < s.cached + len {
                return Err(ModelError::batch("blocks", format!("sequence {i}: {} blocks of {bs} hold fewer than its {} tokens", s.blocks.len(), s.cached + len)));
            }
            let at = table.len() as u32;
            table.extend_from_slice(s.blocks);
            for p in s.cached..s.cached + len {
                slots.push(s.blocks[p / bs] * bs as u32 + (p % bs) as u32);
                q_start.push(at);
                q_keys.push(p as u32 + 1);
            }
        }
        let mut seen = HashSet::with_capacity(slots.len());
        if let Some(&dup) = slots.iter().find(|&&s| !seen.insert(s)) {
            return Err(ModelError::batch("blocks", format!("two new tokens of the step write pool row {dup}")));
        }
        // KeyLayout::new checks every block against the pool
        let layout = Arc::new(KeyLayout::new(table, q_start, q_keys, bs, pool.num_blocks * bs)?);
        plan.validate(&self.cfg, t)?;
        let slots_T = Tensor::from_vec(slots, t, self.device())?;
        let rope = self.rope.tables(step.positions(), 1, t, self.dtype())?;
        let mut x_BTD = self.embed_tokens.forward(&step.input_ids_BT)?;
        let mut routes = Recording::new();
        // each residual add and the norm after it in one launch where the kernels allow it
        let add_norm = |norm: &RmsNorm, a: &Tensor, b: &Tensor| -> Result<(Tensor, Tensor)> {
            if let Some(both) = norm.add_forward(a, b)? {
                return Ok(both);
            }
            let s = (a + b)?;
            let y = norm.forward(&s)?;
            Ok((s, y))
        };
        // the layer's input norm when the add before it computed it
        let mut in_BTD: Option<Tensor> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = match in_BTD.take() {
                Some(y) => y,
                None => layer.input_layernorm.forward(&x_BTD)?,
            };
            let a = layer.self_attn.forward_paged(&normed, &rope, &pool.k[l], &pool.v[l], &slots_T, &layout)?;
            let (h_BTD, y_BTD) = add_norm(&layer.post_attention_layernorm, &x_BTD, &a)?;
            let out_BTD = layer.mlp_forward(&y_BTD, plan, l, step, &mut routes)?;
            x_BTD = match self.layers.get(l + 1) {
                Some(next) => {
                    let (x, y) = add_norm(&next.input_layernorm, &h_BTD, &out_BTD)?;
                    in_BTD = Some(y);
                    x
                }
                None => (h_BTD + out_BTD)?,
            };
        }
        // the LM head only where the sequences sample: each one's last new token
        let last: Vec<u32> = runs.iter().map(|&(s, l)| (s + l - 1) as u32).collect();
        let last = Tensor::from_vec(last, runs.len(), self.device())?;
        let x_BSD = x_BTD.index_select(&last, 1)?;
        let logits = self.lm_head_forward(&self.norm.forward(&x_BSD)?)?;
        Ok(ForwardOutput { logits: logits.to_dtype(DType::F32)?, routes })
    }
}

/// The runs (start, len) of consecutive slots of one sequence in a packed step; padding refused.
fn runs_of(step: &Batch) -> Result<Vec<(usize, usize)>> {
    let seg = step.segments();
    let mut runs = Vec::new();
    let mut s = 0;
    while s < seg.len() {
        let mut e = s + 1;
        while e < seg.len() && seg[e] == seg[s] {
            e += 1;
        }
        if seg[s] == 0 {
            return Err(ModelError::batch("step", "padding slots are not allowed in an incremental step"));
        }
        runs.push((s, e - s));
        s = e;
    }
    Ok(runs)
}
