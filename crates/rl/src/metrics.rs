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
    /// share of greedy held-out completions with reward >= `eval.pass_threshold`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// mean reward of the greedy held-out completions
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_reward: Option<f64>,
    /// `pass@k` on the held-out set (`eval.pass_k`)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub eval_pass_at: BTreeMap<String, f64>,
    /// mean of each `[[reward]]` table's reward over the step's completions
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reward_parts: BTreeMap<String, f64>,
    /// mean of each metric the rewards returned (an `http` verifier's; `http_failures`)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reward_metrics: BTreeMap<String, f64>,
    /// dataset records skipped as invalid (`task.skip_invalid`; the warm-up record)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_records: usize,
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
    /// updates applied this step (mini_steps × epochs, fewer when groups were filtered or
    /// updates skipped)
    #[serde(default)]
    pub updates: usize,
    /// updates skipped this step because the loss or the gradient norm was not finite (the
    /// weights and optimizer state kept; their metrics are left out of the step's means). In
    /// the warm-up record: the warm-up steps skipped
    #[serde(default)]
    pub skipped_nonfinite: usize,
    pub extreme_fraction: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    pub entropy: f64,
    pub fallback_tokens: f64,
    pub completion_tokens: usize,
    pub seconds: f64,
    /// the step's measured peak memory in GB (`lockstep_model::memory_peak`, reset at each
    /// step's start: on CUDA the device pool's high watermark — rollout, scoring and updates —
    /// on the CPU the process's peak resident set), beside the memory plan printed at start-up;
    /// absent where it cannot be read
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_gb: Option<f64>,
    pub layers: BTreeMap<usize, LayerRecord>,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

/// The dotted name of the first `null` in a serialised record: serde_json writes NaN / ±inf
/// as `null`, and a record has no other (an absent `eval_accuracy` is left out).
fn first_null(v: &serde_json::Value, at: &str) -> Option<String> {
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match v {
        serde_json::Value::Null => Some(if at.is_empty() { "<record>".into() } else { at.to_string() }),
        serde_json::Value::Object(m) => m.iter().find_map(|(k, x)| first_null(x, &join(k))),
        serde_json::Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| first_null(x, &join(&i.to_string()))),
        _ => None,
    }
}

/// Append one record as a JSON line. A non-finite number (which JSON cannot hold) is refused
/// with an error naming its field, before anything is written.
pub fn append(path: &Path, rec: &StepRecord) -> Result<()> {
    let value = serde_json::to_value(rec).map_err(|e| RlError::io(path, e))?;
    if let Some(field) = first_null(&value, "") {
        return Err(RlError::io(path, format!("{} step {}: metric `{field}` is not finite (NaN or inf); not written", rec.phase, rec.step)));
    }
    let mut line = serde_json::to_string(rec).map_err(|e| RlError::io(path, e))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| RlError::io(path, e))?;
    // one write: a kill leaves at most a torn last line, which `read` drops
    f.write_all(line.as_bytes()).map_err(|e| RlError::io(path, e))
}

/// Read every record. A torn last line (partial JSON, as a kill in the middle of `append`
/// leaves: no final newline, or the JSON ends early) is dropped with a warning on stderr; any
/// other bad line is an error naming it.
pub fn read(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| RlError::io(path, e))?;
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (k, &(i, l)) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(r) => out.push(r),
            Err(e) if k + 1 == lines.len() && (e.is_eof() || !text.ends_with('\n')) => {
                eprintln!("warning: {}: line {}: dropped a torn last line ({e})", path.display(), i + 1);
            }
            Err(e) => return Err(RlError::io(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}
