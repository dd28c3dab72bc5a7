//! Per-step records of a run, written as JSON lines (`metrics.jsonl`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RlError};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub confidence: f64,
    /// from the step's load over all ranks
    pub max_vio: f64,
    /// the largest of the ranks' own max_vio (= max_vio on one rank)
    #[serde(default)]
    pub max_vio_rank_max: f64,
    /// share of (token, layer) routes where the trainer's free selection equals the inference
    /// route (as sets)
    pub route_agreement: f64,
    /// max_vio as prime-rl logs it (every slot, padding included, the top-k busiest experts
    /// cut: `lockstep_model::metrics::max_vio_prime_rl`), beside ours for dashboards
    #[serde(default)]
    pub max_vio_prime_rl: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// "warmup" or "rl"
    pub phase: String,
    pub step: u64,
    pub replay: bool,
    pub reward_mean: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    pub loss: f64,
    /// KL estimate mean(ρ − 1 − log ρ), averaged over the step's mini-steps
    pub kl: f64,
    /// the largest mini-step KL (the most off-policy update)
    pub kl_max: f64,
    /// train–inference mismatch: the first mini-step's KL estimate, before any update of the
    /// step (0 when the trainer reproduces the engine's log-probabilities exactly)
    #[serde(default)]
    pub train_infer_kl: f64,
    /// max |logp_train − logp_infer| over the first mini-step's completion tokens (before any
    /// update: 0 with the batch-invariant kernels)
    #[serde(default)]
    pub train_infer_logprob_diff_max: f64,
    /// F(τ) of π_θ / π_infer on the first mini-step, before any update
    #[serde(default)]
    pub train_infer_extreme_fraction: f64,
    /// decoupled PPO (`loss.pi_old = "recompute"`): π_old (the trainer's score before the
    /// update) vs π_infer — k3 KL, F(τ), max |Δ logprob| (0 when π_old = π_infer)
    #[serde(default)]
    pub old_infer_kl: f64,
    #[serde(default)]
    pub old_infer_extreme_fraction: f64,
    #[serde(default)]
    pub old_infer_logprob_diff_max: f64,
    /// mean KL penalty term to the reference (0 without one)
    #[serde(default)]
    pub ref_kl: f64,
    /// mean router-shift weight γ (1 unless ratio = router_shift; 0 in old records)
    #[serde(default)]
    pub shift_weight: f64,
    /// groups dropped for zero reward variance (`rollout.filter_zero_variance`)
    #[serde(default)]
    pub filtered_groups: usize,
    /// updates applied this step (mini_steps × epochs, fewer when groups were filtered)
    #[serde(default)]
    pub updates: usize,
    pub extreme_fraction: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    pub entropy: f64,
    pub fallback_tokens: f64,
    pub completion_tokens: usize,
    pub seconds: f64,
    pub layers: BTreeMap<usize, LayerRecord>,
}

pub fn append(path: &Path, rec: &StepRecord) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| RlError::io(path, e))?;
    let line = serde_json::to_string(rec).map_err(|e| RlError::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| RlError::io(path, e))
}

pub fn read(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| RlError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| RlError::io(path, format!("line {}: {e}", i + 1))))
        .collect()
}
