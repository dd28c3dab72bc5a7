//! The RL loss formulas (see `loss.rs`'s doc) against values computed by hand
//! (4 slots, the third masked). Every expected number is its closed form, computed here in f64
//! next to the assertion: with these inputs log ρ = log π_train − log π_infer = [0.2, −1, 0, 0.5]
//! in token mode, the advantages are [1, −1, 2, 0.5] and the denominator is 3.

use candle_core::{Device, Tensor, Var};
use lockstep_trainer::loss::{rl_loss, ExpertAggregation, IsCorrection, LossConfig, LossInputs, Objective, RatioMode};

fn t(v: &[f32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
}

struct Case {
    train: Var,
    router_train: Vec<Var>,
    inputs: LossInputs,
}

fn case() -> Case {
    let train = Var::from_tensor(&t(&[-1.0, -2.0, -0.5, -3.0])).unwrap();
    let router_train = vec![
        Var::from_tensor(&t(&[-0.1, -0.2, -0.3, -0.4])).unwrap(),
        Var::from_tensor(&t(&[-0.5, -0.5, -0.5, -0.5])).unwrap(),
    ];
    let inputs = LossInputs {
        logp_train: train.as_tensor().clone(),
        logp_infer: t(&[-1.2, -1.0, -0.5, -3.5]),
        advantages: t(&[1.0, -1.0, 2.0, 0.5]),
        mask: t(&[1.0, 1.0, 0.0, 1.0]),
        route_logp_train: router_train.iter().map(|v| v.as_tensor().clone()).collect(),
        route_logp_old: vec![t(&[-0.3, -0.2, -0.3, -0.1]), t(&[-0.4, -0.6, -0.5, -0.5])],
        joint_available: Some(t(&[1.0, 1.0, 1.0, 0.0])),
        logp_old: None,
        shift_weight: None,
        logp_ref: None,
        entropy: None,
        sequence: None,
    };
    Case { train, router_train, inputs }
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
}

fn grad(loss: &Tensor, v: &Var) -> Vec<f32> {
    loss.backward().unwrap().get(v.as_tensor()).map(|g| g.to_vec1().unwrap()).unwrap_or_else(|| vec![0.0; 4])
}

fn cfg(objective: Objective, is: IsCorrection, ratio: RatioMode) -> LossConfig {
    LossConfig { objective, is_correction: is, ratio, extreme_tau: 2.0, ..LossConfig::default() }
}

#[test]
fn ppo_token_mode() {
    let c = case();
    let (loss, m) = rl_loss(&cfg(Objective::Ppo { clip_low: 0.2, clip_high: 0.28 }, IsCorrection::None, RatioMode::Token), &c.inputs, 3.0).unwrap();
    // J = [min(ρ0, clip ρ0) = e^0.2, min(−e^−1, −0.8) = −0.8, (masked), min(0.5 e^0.5, 0.5 · 1.28) = 0.64]
    close(loss.to_scalar::<f32>().unwrap() as f64, -(0.2f64.exp() - 0.8 + 0.64) / 3.0);
    // slot 0 unclipped (∂/∂logp = −ρA/3); slots 1 and 3 clipped (no gradient); slot 2 masked
    let g = grad(&loss, &c.train);
    close(g[0] as f64, -(0.2f64.exp()) / 3.0);
    assert_eq!(&g[1..], &[0.0, 0.0, 0.0]);
    close(m.clip_fraction, 2.0 / 3.0);
    // k3 = mean over slots 0, 1, 3 of ρ − 1 − log ρ
    close(m.kl, ((0.2f64.exp() - 1.0 - 0.2) + (-1f64).exp() + (0.5f64.exp() - 1.0 - 0.5)) / 3.0);
    close(m.extreme_fraction, 1.0 / 3.0); // slot 1: 1/ρ = e > 2
    close(m.max_abs_logprob_diff, 1.0); // slot 1: −2 vs −1 (the masked slot 2 does not count)
    assert_eq!(m.tokens, 3.0);
}

#[test]
fn truncated_is() {
    let c = case();
    let (loss, _) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::Tis { cap: 1.5 }, RatioMode::Token), &c.inputs, 3.0).unwrap();
    // J_n = sg(min(ρ_n, 1.5) / ρ_n) ρ_n A_n: value min(ρ_n, 1.5) A_n = [e^0.2, −e^−1, (masked), 1.5 · 0.5],
    // gradient in log π_train −min(ρ_n, 1.5) A_n / 3
    close(loss.to_scalar::<f32>().unwrap() as f64, -(0.2f64.exp() - (-1f64).exp() + 0.75) / 3.0);
    let g = grad(&loss, &c.train);
    for (a, b) in g.iter().zip([-(0.2f64.exp()) / 3.0, (-1f64).exp() / 3.0, 0.0, -0.75 / 3.0]) {
        close(*a as f64, b);
    }
}

#[test]
fn masked_is() {
    let c = case();
    let (loss, m) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::Mis { low: 0.5, high: 1.5 }, RatioMode::Token), &c.inputs, 3.0).unwrap();
    // slots 1 (ρ = 0.37) and 3 (ρ = 1.65) dropped: only slot 0 counts
    close(loss.to_scalar::<f32>().unwrap() as f64, -(0.2f64.exp()) / 3.0);
    assert_eq!((m.mis_dropped, m.tokens), (2.0, 1.0));
}

#[test]
fn joint_token_expert_sum_mean_and_fallback() {
    let c = case();
    let (loss, m) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::None, RatioMode::Joint(ExpertAggregation::Sum)), &c.inputs, 3.0).unwrap();
    // router terms Σ_l (train − old) = [0.2 − 0.1, 0 + 0.1, 0, (fallback)] = [0.1, 0.1, 0, 0], so
    // log ρ = [0.3, −0.9, 0, 0.5] and J = ρ A = [e^0.3, −e^−0.9, (masked), 0.5 e^0.5]
    close(loss.to_scalar::<f32>().unwrap() as f64, -(0.3f64.exp() - (-0.9f64).exp() + 0.5 * 0.5f64.exp()) / 3.0);
    assert_eq!(m.fallback_tokens, 1.0); // slot 3 has no inference router probabilities
    let g = grad(&loss, &c.router_train[0]);
    // ∂loss/∂(router log p of slot 0) = −ρ0 A0 / 3
    close(g[0] as f64, -(0.3f64.exp()) / 3.0);
    assert_eq!(g[3], 0.0, "a fallback slot gives its router no gradient");
    let (loss, _) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::None, RatioMode::Joint(ExpertAggregation::Mean)), &c.inputs, 3.0).unwrap();
    // mean over the 2 layers: router terms [0.05, 0.05, 0, 0], log ρ = [0.25, −0.95, 0, 0.5]
    close(loss.to_scalar::<f32>().unwrap() as f64, -(0.25f64.exp() - (-0.95f64).exp() + 0.5 * 0.5f64.exp()) / 3.0);
}

#[test]
fn joint_without_any_router_probabilities_equals_token_mode() {
    let mut c = case();
    c.inputs.joint_available = Some(t(&[0.0; 4]));
    let joint = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::None, RatioMode::Joint(ExpertAggregation::Sum)), &c.inputs, 3.0).unwrap();
    let token = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::None, RatioMode::Token), &c.inputs, 3.0).unwrap();
    assert_eq!(joint.0.to_scalar::<f32>().unwrap(), token.0.to_scalar::<f32>().unwrap());
    assert_eq!(joint.1.fallback_tokens, 3.0);
}

#[test]
fn bad_inputs_are_named() {
    let mut c = case();
    c.inputs.advantages = t(&[1.0]);
    let e = rl_loss(&LossConfig::default(), &c.inputs, 3.0).unwrap_err().to_string();
    assert!(e.contains("advantages"), "{e}");
    let e = rl_loss(&LossConfig::default(), &case().inputs, 0.0).unwrap_err().to_string();
    assert!(e.contains("denominator"), "{e}");
}
