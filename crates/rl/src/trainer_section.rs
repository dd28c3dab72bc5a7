//! The run config's `[trainer]` section (see [`crate::config`]).

use serde::{Deserialize, Serialize};

fn default_one() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerSection {
    pub lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub warmup_steps: u64,
    pub mini_steps: usize,
    pub token_budget: usize,
    /// passes over the rollout batch (default 1)
    #[serde(default = "default_one")]
    pub epochs: usize,
    /// consecutive updates skipped for a non-finite loss or gradient that stop the run (default 3)
    #[serde(default = "default_max_nonfinite")]
    pub max_nonfinite_steps: u64,
    /// recompute each layer's activations in the backward (default false)
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// positions per LM-head chunk, 0 = the whole micro-batch (default 1024)
    #[serde(default = "default_logits_chunk")]
    pub logits_chunk_tokens: usize,
    /// shard the replicated parameters' optimizer state over the ranks (default false;
    /// `lockstep_trainer::zero`)
    #[serde(default)]
    pub shard_optimizer: bool,
}

fn default_logits_chunk() -> usize {
    1024
}

fn default_max_nonfinite() -> u64 {
    3
}

impl Default for TrainerSection {
    fn default() -> Self {
        Self { lr: 5e-4, weight_decay: 0.0, max_grad_norm: 1.0, warmup_steps: 0, mini_steps: 2, token_budget: 1024, epochs: 1, max_nonfinite_steps: default_max_nonfinite(), activation_checkpointing: false, logits_chunk_tokens: default_logits_chunk(), shard_optimizer: false }
    }
}
