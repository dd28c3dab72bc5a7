//! The trainer's memory plan: what one optimizer step holds on the device, from the model's
//! shape, the trainer's dtype and checkpointing, and the micro-batch token budget — printed at
//! start-up and set beside the measured peak (`lockstep_model::memory_peak`).
//!
//! Per parameter (P of them): the weights in the compute dtype (2 B in bf16, 4 B in f32), the f32
//! master copy in bf16 (4 B), the AdamW moments (8 B), the f32 gradient sums (4 B): 18 B in
//! bf16, 16 B in f32.
//!
//! Activations per token of a micro-batch, per decoder layer kept for the backward (elements of
//! the compute dtype unless said): the layer's input, the two norms' outputs, q / k / v before and
//! after the rotary embedding, the attention output and its projection, the residual sums (8·D +
//! 3·H·Dh + 4·G·Dh); an MoE layer's router logits and scores (2·E, f32) and, per routed expert
//! (K), the gathered row, gate / up, the activation, the down projection and the weighted row
//! (K·(3·D + 3·I)); a dense layer's MLP (3·I_dense + D). With activation checkpointing only each
//! layer's input stays (D per layer) plus one layer's worth while it is recomputed. The LM head
//! runs in chunks of C positions: ≈ 4 f32 [C, V] tensors at once (logits, log-softmax, its exp,
//! their product), twice during the chunk's backward.
//!
//! With the optimizer state sharded over W ranks (`shard_optimizer`, [`crate::zero`]) the
//! master copies and moments are those of the rank's own state only: its expert shards whole and
//! ⌈n / W⌉ of each replicated parameter of n elements ([`MemoryPlan::with_sharded_state`]); the
//! weights and the f32 gradient sums stay whole.
//!
//! Not in the plan: the attention backward's per-sequence [H, L, L] scores (largest sequence L),
//! the rollout engine's KV pool (its own budget), allocator slack.
//!
//! Legend: D hidden, H / G query / kv heads, Dh head dim, E experts, K experts per token, I expert
//! intermediate, V vocab, L layers.

use std::fmt;

use candle_core::DType;
use lockstep_model::ModelConfig;

/// Bytes one step is planned to hold ([module doc](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    pub parameters: u64,
    pub weights: u64,
    pub master: u64,
    pub moments: u64,
    pub gradients: u64,
    /// per token of a micro-batch, all layers
    pub activations_per_token: u64,
    pub micro_batch_tokens: u64,
    pub head_chunk: u64,
    /// parameters whose master copy and moments this rank holds (all of them unless sharded)
    pub state_parameters: u64,
    /// ranks the replicated optimizer state is sharded over (1: not sharded)
    pub state_ranks: u64,
}

impl MemoryPlan {
    /// The plan of a model with `parameters` parameters and config `cfg`, trained in `dtype`
    /// (f32 or bf16), with or without activation checkpointing, over micro-batches of
    /// `micro_batch_tokens` tokens and LM-head chunks of `chunk_tokens` (0: a micro-batch).
    pub fn of(cfg: &ModelConfig, parameters: u64, dtype: DType, checkpointing: bool, micro_batch_tokens: usize, chunk_tokens: usize) -> Self {
        let b = dtype.size_in_bytes() as u64;
        let d = cfg.hidden_size as u64;
        let a = &cfg.attention;
        let (hdh, gdh) = ((a.num_heads * a.head_dim) as u64, (a.num_kv_heads * a.head_dim) as u64);
        let attn = 8 * d + 3 * hdh + 4 * gdh;
        let moe = &cfg.moe;
        let k = moe.router.top_k as u64;
        let e = moe.router.num_experts as u64;
        let i = moe.expert_intermediate_size as u64;
        let per_layer = |l: usize| -> u64 {
            if cfg.is_moe_layer(l) {
                attn * b + 2 * e * 4 + k * (3 * d + 3 * i) * b
            } else {
                attn * b + (3 * cfg.dense_intermediate_size as u64 + d) * b
            }
        };
        let layers = cfg.num_layers;
        let full: u64 = (0..layers).map(per_layer).sum();
        let activations_per_token = if checkpointing { d * b * layers as u64 + (0..layers).map(per_layer).max().unwrap_or(0) } else { full };
        let chunk = if chunk_tokens == 0 { micro_batch_tokens } else { chunk_tokens.min(micro_batch_tokens.max(1)) } as u64;
        let master = if dtype == DType::F32 { 0 } else { 4 * parameters };
        Self {
            parameters,
            weights: b * parameters,
            master,
            moments: 8 * parameters,
            gradients: 4 * parameters,
            activations_per_token,
            micro_batch_tokens: micro_batch_tokens as u64,
            head_chunk: 2 * 4 * 4 * chunk * cfg.vocab_size as u64,
            state_parameters: parameters,
            state_ranks: 1,
        }
    }

    /// The plan with the optimizer state sharded over `ranks` ranks: master copies (bf16) and
    /// moments of `state_parameters` parameters only (the expert shards whole plus ⌈n / W⌉ of
    /// each replicated parameter).
    pub fn with_sharded_state(self, state_parameters: u64, ranks: u64) -> Self {
        let master = if self.master == 0 { 0 } else { 4 * state_parameters };
        Self { master, moments: 8 * state_parameters, state_parameters, state_ranks: ranks.max(1), ..self }
    }

    /// Weights, master copies, moments and gradient sums.
    pub fn states(&self) -> u64 {
        self.weights + self.master + self.moments + self.gradients
    }

    /// Activations of one micro-batch at the token budget.
    pub fn activations(&self) -> u64 {
        self.activations_per_token * self.micro_batch_tokens
    }

    pub fn total(&self) -> u64 {
        self.states() + self.activations() + self.head_chunk
    }
}

/// `bytes` in GB (10⁹), two decimals.
pub fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = |x: u64| if self.parameters > 0 { x as f64 / self.parameters as f64 } else { 0.0 };
        write!(
            f,
            "memory plan: {} parameters — weights {}, master {}, moments {}, gradients {} ({:.0} B/parameter); activations {} ({:.1} KB/token × {} tokens); LM-head chunk {}; total {}",
            self.parameters,
            gb(self.weights),
            gb(self.master),
            gb(self.moments),
            gb(self.gradients),
            per(self.states()),
            gb(self.activations()),
            self.activations_per_token as f64 / 1e3,
            self.micro_batch_tokens,
            gb(self.head_chunk),
            gb(self.total()),
        )?;
        if self.state_ranks > 1 {
            write!(f, " (optimizer state sharded over {} ranks: master and moments of {} parameters on this rank)", self.state_ranks, self.state_parameters)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_state_counts_a_rank_slice() {
        let cfg = lockstep_model::MoeCausalLm::embedded_default(0, DType::F32, &candle_core::Device::Cpu).unwrap().cfg;
        let whole = MemoryPlan::of(&cfg, 1_000, DType::BF16, false, 16, 0);
        assert_eq!((whole.master, whole.moments, whole.state_ranks), (4_000, 8_000, 1));
        // 800 replicated over 4 ranks (200 each) + 200 of this rank's experts
        let s = whole.with_sharded_state(400, 4);
        assert_eq!((s.weights, s.master, s.moments, s.gradients), (2_000, 1_600, 3_200, 4_000));
        // master 4 + moments 8 B of each of the 600 parameters this rank no longer holds
        assert_eq!(s.states(), whole.states() - 12 * (1_000 - 400));
        assert!(s.to_string().contains("sharded over 4 ranks"), "{s}");
        assert!(!whole.to_string().contains("sharded"));
        // f32: no master copies either way
        let f = MemoryPlan::of(&cfg, 1_000, DType::F32, false, 16, 0).with_sharded_state(250, 4);
        assert_eq!((f.master, f.moments), (0, 2_000));
    }
}
