//! The RL loss over a packed micro-batch, per token slot n (only slots with mask m_n = 1 count:
//! completion tokens). Every per-slot input is indexed by the slot of the token it is about;
//! route terms come from the position that computed that token ([`crate::route_terms`]).
//!
//! Three policies: π_θ (the trainer now, with gradient), π_infer (the behaviour policy that
//! sampled, its log-probs sent with the sample) and π_old (the policy the PPO trust region is
//! centred on). `PiOld::Infer`: π_old = π_infer (right while engine and trainer are bitwise
//! equal). `PiOld::Recompute` (decoupled PPO): π_old is the trainer's own score of the rollout
//! batch before the first update (same weights as the engine, replayed routes), and
//! π_old / π_infer is the importance weight that corrects for the engine's mismatch.
//! All log-probabilities are of the distribution at the sampling temperature T
//! (log-softmax(logits / T)), on both sides.
//!
//! **Ratio** ρ_n, against π_old:
//! - `Token`: log ρ_n = log π_θ(y_n) − log π_old(y_n);
//! - `Joint(agg)` (the policy chooses the token *and* the experts that computed it):
//!   ```text
//!   log ρ_n = [log π_θ(y_n) − log π_old(y_n)] + agg_l [log P_θ,l(S_l) − log P_old,l(S_l)]
//!   ```
//!   S_l the route of layer l at position n − 1 and log P its Plackett–Luce log-probability
//!   (`route_terms`); agg = Σ_l (`Sum`) or (1/L) Σ_l (`Mean`). A slot without old router
//!   probabilities (`joint_available = 0`) falls back to the token term; such slots are counted.
//!   Needs replayed routes (both sides then score the same experts) and a softmax router;
//!   refused otherwise at config time;
//! - `RouterShift { floor }` (RSPO): token ratio times the stop-gradient γ_n of
//!   `route_terms` (ρ_n ← γ_n ρ_n before clipping).
//!
//! **Sequence level** (`Objective::Gspo`): log s_i = (1/|y_i|) Σ_{n ∈ y_i} log ρ_n over the
//! counted slots of sample i, and every slot of sample i takes ρ_n ← s_i (gradient through all
//! its tokens), then the same clipped objective; its tokens are summed with the same
//! denominator as the token objective (a sample weighs by its length, as the token mean).
//!
//! **Objective** per slot, advantage A_n:
//! - `Ppo` / `Gspo { clip_low, clip_high }`: J_n = min(ρ_n A_n, clip(ρ_n, 1 − clip_low, 1 + clip_high) A_n);
//! - `PolicyGradient`: J_n = ρ_n A_n (its gradient is ρ_n A_n ∇ log π).
//!
//! **Importance-sampling correction** of the behaviour mismatch:
//! - with `PiOld::Recompute`, on w_n = π_old(y_n) / π_infer(y_n) (a constant):
//!   `None`: J_n ← J_n; `Tis { cap }`: J_n ← min(w_n, C) J_n; `Mis { low, high }`: slots with
//!   w_n outside [low, high] are dropped (m_n ← 0), the rest J_n ← w_n J_n;
//! - with `PiOld::Infer` (ρ itself is against π_infer): `Tis`: J_n ← sg(min(ρ_n, C) / ρ_n) J_n;
//!   `Mis`: slots with ρ_n outside [low, high] are dropped.
//!
//! **Loss** = −Σ_n m_n J_n / D + β Σ_n m_n k_n / D − c Σ_n m_n H_n / D, where D is the number of
//! loss tokens of the whole optimizer step (so accumulating micro-batches gives the step's token
//! mean), k_n the KL penalty to a frozen reference π_ref (coefficient β = `kl_coef`;
//! `K1`: k = log π_θ − log π_ref; `K3`: k = r − 1 − log r with r = π_ref / π_θ), and H_n the
//! entropy of π_θ at slot n (coefficient c = `entropy_coef`), both with gradient.
//!
//! Metrics over counted slots: KL estimate mean(ρ − 1 − log ρ) (k3, ≥ 0; ρ before γ and before
//! the sequence step), extreme-token fraction F(τ) = mean 1[max(ρ, 1/ρ) > τ], PPO clip fraction,
//! MIS drop count, fallback count, and the same KL / F(τ) for π_θ vs π_infer (token level)
//! and, when π_old is recomputed, for π_old vs π_infer.

use candle_core::{DType, Tensor};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Ppo { clip_low: f64, clip_high: f64 },
    /// GSPO: the sequence-level ratio (geometric mean over the sample's tokens), clipped.
    Gspo { clip_low: f64, clip_high: f64 },
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
    RouterShift { floor: f64 },
}

/// What PPO is centred on (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PiOld {
    #[default]
    Infer,
    Recompute,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    K1,
    K3,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub objective: Objective,
    pub is_correction: IsCorrection,
    pub ratio: RatioMode,
    pub pi_old: PiOld,
    /// τ of the extreme-token fraction.
    pub extreme_tau: f64,
    /// β of the KL penalty to the reference model (0: none)
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    /// c of the entropy bonus (0: none)
    pub entropy_coef: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Ppo { clip_low: 0.2, clip_high: 0.28 },
            is_correction: IsCorrection::None,
            ratio: RatioMode::Token,
            pi_old: PiOld::Infer,
            extreme_tau: 2.0,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
        }
    }
}

/// Per-slot inputs, all [N] f32 on the model's device (see [`LossInputs::new`]).
#[derive(Debug, Clone)]
pub struct LossInputs {
    /// log π_θ(y_n), with gradient
    pub logp_train: Tensor,
    /// log π_infer(y_n)
    pub logp_infer: Tensor,
    /// log π_old(y_n) (`PiOld::Recompute`); `None`: π_old = π_infer
    pub logp_old: Option<Tensor>,
    pub advantages: Tensor,
    /// 1 on completion tokens
    pub mask: Tensor,
    /// per MoE layer: log P_θ,l of the route that computed slot n, with gradient (joint mode)
    pub route_logp_train: Vec<Tensor>,
    /// per MoE layer: log P_old,l of that route (joint mode)
    pub route_logp_old: Vec<Tensor>,
    /// 1 where old router probabilities exist (joint mode), else the token term alone
    pub joint_available: Option<Tensor>,
    /// γ_n of the router-shift ratio (no gradient)
    pub shift_weight: Option<Tensor>,
    /// log π_ref(y_n) of the frozen reference (KL penalty)
    pub logp_ref: Option<Tensor>,
    /// H_n of π_θ at slot n, with gradient (entropy bonus)
    pub entropy: Option<Tensor>,
    /// sample id per slot (GSPO's sequences)
    pub sequence: Option<Vec<u32>>,
}

impl LossInputs {
    /// The token-level inputs; the optional ones unset.
    pub fn new(logp_train: Tensor, logp_infer: Tensor, advantages: Tensor, mask: Tensor) -> Self {
        Self {
            logp_train,
            logp_infer,
            logp_old: None,
            advantages,
            mask,
            route_logp_train: Vec::new(),
            route_logp_old: Vec::new(),
            joint_available: None,
            shift_weight: None,
            logp_ref: None,
            entropy: None,
            sequence: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossMetrics {
    pub tokens: f64,
    /// k3 of ρ (π_θ vs π_old, route terms included)
    pub kl: f64,
    pub extreme_fraction: f64,
    pub clip_fraction: f64,
    pub mis_dropped: f64,
    pub fallback_tokens: f64,
    pub mean_ratio: f64,
    /// max |logp_train − logp_infer| over the completion tokens (the token log-probabilities
    /// alone): 0 when the trainer reproduces the engine exactly, before any update
    pub max_abs_logprob_diff: f64,
    /// k3 and F(τ) of π_θ vs π_infer, token level
    pub infer_kl: f64,
    pub infer_extreme_fraction: f64,
    /// k3 and F(τ) of π_old vs π_infer (0 when π_old = π_infer)
    pub old_infer_kl: f64,
    pub old_infer_extreme_fraction: f64,
    /// mean KL penalty term k_n (0 without a reference)
    pub ref_kl: f64,
    /// mean γ_n (1 unless router shift)
    pub shift_weight: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

fn f32_mask(t: Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// Σ m k3(log r) and Σ m 1[max(r, 1/r) > τ] for a detached log-ratio.
fn k3_and_extreme(log_r: &Tensor, mask: &Tensor, tau: f64) -> Result<(f64, f64)> {
    let r = log_r.exp()?;
    let k3 = ((&r - 1.0)? - log_r)?;
    let extreme = f32_mask(r.maximum(&r.recip()?)?.gt(tau)?)?;
    Ok((scalar(&(k3 * mask)?)?, scalar(&(extreme * mask)?)?))
}

/// Per-slot mean of `x` over each sequence's counted slots, broadcast back to its slots.
fn sequence_mean(x: &Tensor, mask: &[f32], seq: &[u32]) -> Result<Tensor> {
    let n = seq.len();
    let mut ids: Vec<u32> = seq.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let s = ids.len();
    // M[i, n] = m_n / Σ_{n' ∈ i} m_n' for the slots of sequence i
    let mut count = vec![0f32; s];
    let index = |q: u32| ids.binary_search(&q).expect("listed");
    for (k, &q) in seq.iter().enumerate() {
        count[index(q)] += mask[k];
    }
    let mut m = vec![0f32; s * n];
    let mut back = vec![0f32; n * s];
    for (k, &q) in seq.iter().enumerate() {
        let i = index(q);
        if count[i] > 0.0 {
            m[i * n + k] = mask[k] / count[i];
        }
        back[k * s + i] = 1.0;
    }
    let dev = x.device();
    let m = Tensor::from_vec(m, (s, n), dev)?;
    let back = Tensor::from_vec(back, (n, s), dev)?;
    let mean_S1 = m.matmul(&x.unsqueeze(1)?)?;
    Ok(back.matmul(&mean_S1)?.squeeze(1)?)
}

/// Loss (a scalar with gradient) and metrics; `denominator` = loss tokens of the whole step.
pub fn rl_loss(cfg: &LossConfig, x: &LossInputs, denominator: f64) -> Result<(Tensor, LossMetrics)> {
    if denominator <= 0.0 {
        return Err(TrainError::input("denominator", "must be > 0 (no loss tokens in the step?)"));
    }
    let n = x.logp_train.dims1()?;
    let optional = [("logp_old", x.logp_old.as_ref()), ("joint_available", x.joint_available.as_ref()), ("shift_weight", x.shift_weight.as_ref()), ("logp_ref", x.logp_ref.as_ref()), ("entropy", x.entropy.as_ref())];
    for (name, t) in [("logp_infer", Some(&x.logp_infer)), ("advantages", Some(&x.advantages)), ("mask", Some(&x.mask))].into_iter().chain(optional) {
        if let Some(t) = t {
            if t.dims1()? != n {
                return Err(TrainError::input(name, format!("{} entries for {n} slots", t.dims1()?)));
            }
        }
    }
    if cfg.pi_old == PiOld::Recompute && x.logp_old.is_none() {
        return Err(TrainError::input("logp_old", "pi_old = recompute needs the old policy's log-probs (Trainer::score)"));
    }
    let old = x.logp_old.as_ref().unwrap_or(&x.logp_infer);
    let mut log_ratio = (&x.logp_train - old)?;
    let mut fallback = 0.0;
    if let RatioMode::Joint(agg) = cfg.ratio {
        if x.route_logp_train.len() != x.route_logp_old.len() {
            return Err(TrainError::input("route_logp_old", "one entry per MoE layer, as route_logp_train"));
        }
        let avail = match &x.joint_available {
            Some(a) => a.clone(),
            None => x.mask.ones_like()?,
        };
        if !x.route_logp_train.is_empty() {
            let mut expert = x.logp_train.zeros_like()?;
            for (tr, old) in x.route_logp_train.iter().zip(&x.route_logp_old) {
                expert = (expert + (tr - old)?)?;
            }
            if agg == ExpertAggregation::Mean {
                expert = (expert / x.route_logp_train.len() as f64)?;
            }
            log_ratio = (log_ratio + (expert * &avail)?)?;
        }
        fallback = scalar(&((1.0 - &avail)? * &x.mask)?)?;
    }
    let mut mask = x.mask.clone();
    let host_mask: Vec<f32> = mask.to_vec1()?;
    // metrics of ρ itself (before the sequence step and γ)
    let lr_detached = log_ratio.detach();

    if let Objective::Gspo { .. } = cfg.objective {
        let seq = x.sequence.as_ref().ok_or_else(|| TrainError::input("sequence", "GSPO needs the sample of every slot"))?;
        if seq.len() != n {
            return Err(TrainError::input("sequence", format!("{} entries for {n} slots", seq.len())));
        }
        log_ratio = sequence_mean(&(&log_ratio * &mask)?, &host_mask, seq)?;
    }
    let mut ratio = log_ratio.exp()?;
    let mut shift_mean = 1.0;
    if let (RatioMode::RouterShift { .. }, Some(g)) = (cfg.ratio, &x.shift_weight) {
        let g = g.detach();
        ratio = (ratio * &g)?;
        let t = scalar(&mask)?;
        shift_mean = if t > 0.0 { scalar(&(&g * &mask)?)? / t } else { 1.0 };
    }
    let ratio_d = ratio.detach();

    // behaviour-mismatch weight: w = π_old / π_infer (decoupled), or the IS step on ρ itself
    let mut weight: Option<Tensor> = None;
    let mut mis_dropped = 0.0;
    let base = scalar(&mask)?;
    match (x.logp_old.as_ref(), cfg.is_correction) {
        (_, IsCorrection::None) => {}
        (Some(old), IsCorrection::Tis { cap }) => weight = Some((old - &x.logp_infer)?.exp()?.clamp(0.0, cap)?),
        (Some(old), IsCorrection::Mis { low, high }) => {
            let w = (old - &x.logp_infer)?.exp()?;
            let keep = f32_mask(w.ge(low)?)?.mul(&f32_mask(w.le(high)?)?)?;
            mask = (&mask * &keep)?;
            weight = Some(w);
        }
        (None, IsCorrection::Tis { cap }) => weight = Some((ratio_d.clamp(0.0, cap)? / &ratio_d)?),
        (None, IsCorrection::Mis { low, high }) => {
            let keep = f32_mask(ratio_d.ge(low)?)?.mul(&f32_mask(ratio_d.le(high)?)?)?;
            mask = (&mask * &keep)?;
        }
    }
    if matches!(cfg.is_correction, IsCorrection::Mis { .. }) {
        mis_dropped = base - scalar(&mask)?;
    }

    let adv = &x.advantages;
    let (mut objective, clip_fraction_num) = match cfg.objective {
        Objective::PolicyGradient => ((&ratio * adv)?, 0.0),
        Objective::Ppo { clip_low, clip_high } | Objective::Gspo { clip_low, clip_high } => {
            let unclipped = (&ratio * adv)?;
            let clipped = (ratio.clamp(1.0 - clip_low, 1.0 + clip_high)? * adv)?;
            let clip_active = f32_mask(clipped.lt(&unclipped)?)?;
            (unclipped.minimum(&clipped)?, scalar(&(clip_active * &mask)?)?)
        }
    };
    if let Some(w) = &weight {
        objective = (objective * w.detach())?;
    }
    let mut loss = ((&objective * &mask)?.sum_all()?.neg()? / denominator)?;
    let mut ref_sum = 0.0;
    if let Some(lref) = &x.logp_ref {
        let k = match cfg.kl_estimator {
            KlEstimator::K1 => (&x.logp_train - lref)?,
            KlEstimator::K3 => {
                let d = (lref - &x.logp_train)?;
                ((d.exp()? - &d)? - 1.0)?
            }
        };
        ref_sum = scalar(&(k.detach() * &mask)?)?;
        if cfg.kl_coef != 0.0 {
            loss = (loss + ((k * &mask)?.sum_all()? * (cfg.kl_coef / denominator))?)?;
        }
    }
    if let (Some(h), true) = (&x.entropy, cfg.entropy_coef != 0.0) {
        loss = (loss - ((h * &mask)?.sum_all()? * (cfg.entropy_coef / denominator))?)?;
    }

    // metrics over the counted slots (after MIS)
    let tokens = scalar(&mask)?;
    let per = |v: f64, d: f64| if d > 0.0 { v / d } else { 0.0 };
    let (kl_sum, extreme_sum) = k3_and_extreme(&lr_detached, &mask, cfg.extreme_tau)?;
    let token_lr = (&x.logp_train - &x.logp_infer)?.detach();
    let (ikl, iext) = k3_and_extreme(&token_lr, &mask, cfg.extreme_tau)?;
    let (okl, oext) = match &x.logp_old {
        Some(old) => k3_and_extreme(&(old - &x.logp_infer)?, &mask, cfg.extreme_tau)?,
        None => (0.0, 0.0),
    };
    let counted = tokens;
    let metrics = LossMetrics {
        tokens,
        kl: per(kl_sum, counted),
        extreme_fraction: per(extreme_sum, counted),
        clip_fraction: per(clip_fraction_num, tokens),
        mis_dropped,
        fallback_tokens: fallback,
        mean_ratio: per(scalar(&(&ratio_d * &mask)?)?, tokens),
        max_abs_logprob_diff: if n == 0 { 0.0 } else { (token_lr.abs()? * &x.mask)?.to_dtype(DType::F64)?.max_all()?.to_scalar::<f64>()? },
        infer_kl: per(ikl, counted),
        infer_extreme_fraction: per(iext, counted),
        old_infer_kl: per(okl, counted),
        old_infer_extreme_fraction: per(oext, counted),
        ref_kl: per(ref_sum, counted),
        shift_weight: shift_mean,
    };
    Ok((loss, metrics))
}
