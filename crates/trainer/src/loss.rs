//! The RL loss over a packed micro-batch, per token slot n (only slots with mask m_n = 1 count:
//! completion tokens).
//!
//! **Token mode.** log ρ_n = log π_train(y_n) − log π_infer(y_n), ρ_n = exp(log ρ_n).
//!
//! **Joint token+expert mode.** The policy chooses the token *and* the experts that computed it.
//! For each MoE layer l the selected experts S_l(n) of slot n (the replayed ones) carry router
//! probabilities from the trainer (live, with gradient) and from inference (the route trace):
//!
//! ```text
//! log ρ_n = [log π_train(y_n) − log π_infer(y_n)]
//!         + agg_l Σ_{e ∈ S_l(n)} [log p_train,l(e | n) − log p_infer,l(e | n)]
//! ```
//!
//! with agg = Σ_l (`ExpertAggregation::Sum`) or (1/L) Σ_l (`Mean`, L = number of MoE layers).
//! A slot without inference router probabilities (`joint_available = 0`: the sample came
//! without routes or probabilities) falls back to the token term alone; such slots are counted.
//!
//! **Objective** per slot, advantage A_n:
//! - `Ppo { clip_low, clip_high }`: J_n = min(ρ_n A_n, clip(ρ_n, 1 − clip_low, 1 + clip_high) A_n);
//! - `PolicyGradient`: J_n = ρ_n A_n (its gradient is ρ_n A_n ∇ log π).
//!
//! **Importance-sampling correction** on top:
//! - `Tis { cap }` (truncated IS): J_n ← sg(min(ρ_n, C) / ρ_n) · J_n — a slot's effective
//!   importance weight is capped at C, its gradient direction kept;
//! - `Mis { low, high }` (masked IS): slots with ρ_n outside [low, high] are dropped (m_n ← 0).
//!
//! **Loss** = −Σ_n m_n J_n / denominator, where the denominator is the number of loss tokens
//! of the whole optimizer step (so accumulating micro-batches gives the step's token mean).
//!
//! Metrics over counted slots: KL estimate mean(ρ − 1 − log ρ) (k3, ≥ 0), extreme-token fraction
//! F(τ) = mean 1[max(ρ, 1/ρ) > τ], PPO clip fraction, MIS drop count, fallback count.

use candle_core::{DType, Tensor};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Ppo { clip_low: f64, clip_high: f64 },
    PolicyGradient,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IsCorrection {
    None,
    Tis { cap: f64 },
    Mis { low: f64, high: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertAggregation {
    Sum,
    Mean,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RatioMode {
    Token,
    Joint(ExpertAggregation),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub objective: Objective,
    pub is_correction: IsCorrection,
    pub ratio: RatioMode,
    /// τ of the extreme-token fraction.
    pub extreme_tau: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Ppo { clip_low: 0.2, clip_high: 0.28 },
            is_correction: IsCorrection::None,
            ratio: RatioMode::Token,
            extreme_tau: 2.0,
        }
    }
}

/// Per-slot inputs, all [N] f32 on the model's device.
#[derive(Debug, Clone)]
pub struct LossInputs {
    /// log π_train(y_n), with gradient
    pub logp_train: Tensor,
    /// log π_infer(y_n)
    pub logp_infer: Tensor,
    pub advantages: Tensor,
    /// 1 on completion tokens
    pub mask: Tensor,
    /// per MoE layer: Σ_{e ∈ S_l(n)} log p_train,l(e | n), with gradient (joint mode)
    pub router_logp_train: Vec<Tensor>,
    /// per MoE layer: Σ_{e ∈ S_l(n)} log p_infer,l(e | n) (joint mode)
    pub router_logp_infer: Vec<Tensor>,
    /// 1 where inference router probabilities exist (joint mode), else the token term alone
    pub joint_available: Option<Tensor>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossMetrics {
    pub tokens: f64,
    pub kl: f64,
    pub extreme_fraction: f64,
    pub clip_fraction: f64,
    pub mis_dropped: f64,
    pub fallback_tokens: f64,
    pub mean_ratio: f64,
    /// max |logp_train − logp_infer| over the completion tokens (the token log-probabilities
    /// alone): 0 when the trainer reproduces the engine exactly, before any update
    pub max_abs_logprob_diff: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// Loss (a scalar with gradient) and metrics; `denominator` = loss tokens of the whole step.
pub fn rl_loss(cfg: &LossConfig, x: &LossInputs, denominator: f64) -> Result<(Tensor, LossMetrics)> {
    if denominator <= 0.0 {
        return Err(TrainError::input("denominator", "must be > 0 (no loss tokens in the step?)"));
    }
    let n = x.logp_train.dims1()?;
    for (name, t) in [("logp_infer", &x.logp_infer), ("advantages", &x.advantages), ("mask", &x.mask)] {
        if t.dims1()? != n {
            return Err(TrainError::input(name, format!("{} entries for {n} slots", t.dims1()?)));
        }
    }
    let mut log_ratio = (&x.logp_train - &x.logp_infer)?;
    let mut fallback = 0.0;
    if let RatioMode::Joint(agg) = cfg.ratio {
        if x.router_logp_train.len() != x.router_logp_infer.len() {
            return Err(TrainError::input("router_logp_infer", "one entry per MoE layer, as router_logp_train"));
        }
        let avail = match &x.joint_available {
            Some(a) => a.clone(),
            None => x.mask.ones_like()?,
        };
        if !x.router_logp_train.is_empty() {
            let mut expert = x.logp_train.zeros_like()?;
            for (tr, inf) in x.router_logp_train.iter().zip(&x.router_logp_infer) {
                expert = (expert + (tr - inf)?)?;
            }
            if agg == ExpertAggregation::Mean {
                expert = (expert / x.router_logp_train.len() as f64)?;
            }
            log_ratio = (log_ratio + (expert * &avail)?)?;
        }
        fallback = scalar(&((1.0 - &avail)? * &x.mask)?)?;
    }
    let ratio = log_ratio.exp()?;
    let ratio_d = ratio.detach();
    let mut mask = x.mask.clone();
    let mut mis_dropped = 0.0;
    if let IsCorrection::Mis { low, high } = cfg.is_correction {
        let keep = ratio_d.ge(low)?.to_dtype(DType::F32)?.mul(&ratio_d.le(high)?.to_dtype(DType::F32)?)?;
        let kept = (&mask * &keep)?;
        mis_dropped = scalar(&mask)? - scalar(&kept)?;
        mask = kept;
    }
    let adv = &x.advantages;
    let (mut objective, clip_fraction_num) = match cfg.objective {
        Objective::PolicyGradient => ((&ratio * adv)?, 0.0),
        Objective::Ppo { clip_low, clip_high } => {
            let unclipped = (&ratio * adv)?;
            let clipped = (ratio.clamp(1.0 - clip_low, 1.0 + clip_high)? * adv)?;
            let clip_active = clipped.lt(&unclipped)?.to_dtype(DType::F32)?;
            (unclipped.minimum(&clipped)?, scalar(&(clip_active * &mask)?)?)
        }
    };
    if let IsCorrection::Tis { cap } = cfg.is_correction {
        let w = (ratio_d.clamp(0.0, cap)? / &ratio_d)?;
        objective = (objective * w)?;
    }
    let loss = ((&objective * &mask)?.sum_all()?.neg()? / denominator)?;

    // metrics over the counted slots
    let tokens = scalar(&mask)?;
    let lr = log_ratio.detach();
    let k3 = ((&ratio_d - 1.0)? - &lr)?;
    let inv = ratio_d.recip()?;
    let extreme = ratio_d.maximum(&inv)?.gt(cfg.extreme_tau)?.to_dtype(DType::F32)?;
    let per = |v: f64| if tokens > 0.0 { v / tokens } else { 0.0 };
    let metrics = LossMetrics {
        tokens,
        kl: per(scalar(&(k3 * &mask)?)?),
        extreme_fraction: per(scalar(&(extreme * &mask)?)?),
        clip_fraction: per(clip_fraction_num),
        mis_dropped,
        fallback_tokens: fallback,
        mean_ratio: per(scalar(&(&ratio_d * &mask)?)?),
        max_abs_logprob_diff: if n == 0 {
            0.0
        } else {
            ((&x.logp_train - &x.logp_infer)?.detach().abs()? * &x.mask)?.to_dtype(DType::F64)?.max_all()?.to_scalar::<f64>()?
        },
    };
    Ok((loss, metrics))
}
