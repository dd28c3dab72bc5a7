//! The RL loss formulas (see `loss.rs`'s doc) against values computed by hand
//! (4 slots, the third masked; expected numbers from the formulas in f64).

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
        router_logp_train: router_train.iter().map(|v| v.as_tensor().clone()).collect(),
        router_logp_infer: vec![t(&[-0.3, -0.2, -0.3, -0.1]), t(&[-0.4, -0.6, -0.5, -0.5])],
        joint_available: Some(t(&[1.0, 1.0, 1.0, 0.0])),
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
    LossConfig { objective, is_correction: is, ratio, extreme_tau: 2.0 }
}

#[test]
fn ppo_token_mode() {
    let c = case();
    let (loss, m) = rl_loss(&cfg(Objective::Ppo { clip_low: 0.2, clip_high: 0.28 }, IsCorrection::None, RatioMode::Token), &c.inputs, 3.0).unwrap();
    close(loss.to_scalar::<f32>().unwrap() as f64, -0.3538009193867233);
    // slot 0 unclipped (∂/∂logp = −ρA/3); slots 1 and 3 clipped (no gradient); slot 2 masked
    let g = grad(&loss, &c.train);
    close(g[0] as f64, -1.2214027581601699 / 3.0);
    assert_eq!(&g[1..], &[0.0, 0.0, 0.0]);
    close(m.clip_fraction, 2.0 / 3.0);
    close(m.kl, 0.17933449001058013);
    close(m.extreme_fraction, 1.0 / 3.0); // slot 1: 1/ρ = e > 2
    close(m.max_abs_logprob_diff, 1.0); // slot 1: −2 vs −1 (the masked slot 2 does not count)
    assert_eq!(m.tokens, 3.0);
}

#[test]
fn truncated_is() {
    let c = case();
    let (loss, _) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::Tis { cap: 1.5 }, RatioMode::Token), &c.inputs, 3.0).unwrap();
    close(loss.to_scalar::<f32>().unwrap() as f64, -0.5345077723295758);
    let g = grad(&loss, &c.train);
    for (a, b) in g.iter().zip([-0.4071342527200566, 0.12262648039048078, 0.0, -0.25]) {
        close(*a as f64, b);
    }
}

#[test]
fn masked_is() {
    let c = case();
    let (loss, m) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::Mis { low: 0.5, high: 1.5 }, RatioMode::Token), &c.inputs, 3.0).unwrap();
    // slots 1 (ρ = 0.37) and 3 (ρ = 1.65) dropped: only slot 0 counts
    close(loss.to_scalar::<f32>().unwrap() as f64, -1.2214027581601699 / 3.0);
    assert_eq!((m.mis_dropped, m.tokens), (2.0, 1.0));
}

#[test]
fn joint_token_expert_sum_mean_and_fallback() {
    let c = case();
    let (loss, m) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::None, RatioMode::Joint(ExpertAggregation::Sum)), &c.inputs, 3.0).unwrap();
    close(loss.to_scalar::<f32>().unwrap() as f64, -0.5892165943951561);
    assert_eq!(m.fallback_tokens, 1.0); // slot 3 has no inference router probabilities
    let g = grad(&loss, &c.router_train[0]);
    close(g[0] as f64, -0.44995293585866764);
    assert_eq!(g[3], 0.0, "a fallback slot gives its router no gradient");
    let (loss, _) = rl_loss(&cfg(Objective::PolicyGradient, IsCorrection::None, RatioMode::Joint(ExpertAggregation::Mean)), &c.inputs, 3.0).unwrap();
    close(loss.to_scalar::<f32>().unwrap() as f64, -0.5738816761944348);
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
