//! What a trainer step, a warm-up step and π_old scoring measured.

use std::collections::BTreeMap;

/// Routing health of one MoE layer over a step (all its micro-batches, on every rank).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerStepMetrics {
    /// token-weighted mean routing confidence
    pub confidence: f64,
    /// max_vio of the step's load (tokens per expert summed over the micro-batches and ranks):
    /// the imbalance the experts' owners see
    pub max_vio: f64,
    /// the largest max_vio of one rank's own load (equal to `max_vio` on one rank)
    pub max_vio_rank_max: f64,
    /// share of real (token, layer) routes where the trainer's free selection (from its live
    /// router scores) equals the inference route, as sets of experts
    pub route_agreement: f64,
    /// max_vio as prime-rl logs it (`lockstep_model::metrics::max_vio_prime_rl`: every slot of
    /// a micro-batch, padding included, the top-k busiest experts cut), the mean over the step's
    /// micro-batches (and ranks) where it is defined; 0 where it never is
    pub max_vio_prime_rl: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub entropy: f64,
    pub kl: f64,
    /// max |logp_train − logp_infer| over the step's completion tokens (over ranks: the max)
    pub max_abs_logprob_diff: f64,
    pub extreme_fraction: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: f64,
    pub fallback_tokens: f64,
    pub mis_dropped: f64,
    /// k3 KL and F(τ) of π_θ vs π_infer, token level
    pub infer_kl: f64,
    pub infer_extreme_fraction: f64,
    /// KL penalty term to the reference (mean k_n), 0 without one
    pub ref_kl: f64,
    /// mean router-shift weight γ (1 unless ratio = router_shift)
    pub shift_weight: f64,
    pub layers: BTreeMap<usize, LayerStepMetrics>,
    /// The loss or the global gradient norm was not finite (the same on every rank): the update
    /// was skipped (weights, AdamW moments and step counter untouched) and the non-finite
    /// metrics of the step are written as 0.
    pub skipped_nonfinite: bool,
    /// Seconds per phase of the step (plan, forward, loss, backward_*, metrics, reduce,
    /// optimizer), summed over its micro-batches; empty unless `TrainerConfig::time_phases`.
    pub phases: crate::phases::PhaseSeconds,
}

/// What [`Trainer::sft_step_checked`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SftMetrics {
    /// the supervised loss (over ranks: the sum of the ranks' shares); 0 when skipped and not finite
    pub loss: f64,
    /// global gradient norm before clipping; 0 when skipped and not finite
    pub grad_norm: f64,
    /// the loss or the gradient norm was not finite: the update was skipped
    pub skipped_nonfinite: bool,
}

/// `x`, or 0 when it is NaN / ±inf (metrics of a skipped step).
pub(crate) fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// What [`Trainer::score`] measured: π_old (the trainer before the update) against π_infer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreMetrics {
    pub tokens: f64,
    /// k3 estimate of KL(π_infer ‖ π_old) over the completion tokens
    pub kl: f64,
    /// F(τ) of π_old / π_infer
    pub extreme_fraction: f64,
    /// max |log π_old − log π_infer|
    pub max_abs_logprob_diff: f64,
}

impl StepMetrics {
    /// Every non-finite value → 0 (a skipped step's metrics: JSON has no NaN).
    pub(crate) fn sanitize(&mut self) {
        for x in [
            &mut self.loss,
            &mut self.entropy,
            &mut self.kl,
            &mut self.max_abs_logprob_diff,
            &mut self.extreme_fraction,
            &mut self.clip_fraction,
            &mut self.grad_norm,
            &mut self.lr,
            &mut self.tokens,
            &mut self.fallback_tokens,
            &mut self.mis_dropped,
            &mut self.infer_kl,
            &mut self.infer_extreme_fraction,
            &mut self.ref_kl,
            &mut self.shift_weight,
        ] {
            *x = finite_or_zero(*x);
        }
        for l in self.layers.values_mut() {
            for x in [&mut l.confidence, &mut l.max_vio, &mut l.max_vio_rank_max, &mut l.route_agreement, &mut l.max_vio_prime_rl] {
                *x = finite_or_zero(*x);
            }
        }
    }
}

