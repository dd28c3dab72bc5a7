//! The RL objective end to end on engine rollouts: alignment of the route terms (a property
//! over every position), temperature, decoupled PPO (π_old recomputed), expert choice replayed
//! through the trainer, route agreement, and the config guards of the joint ratio.

use candle_core::{DType, Device};
use lockstep_engine::{Engine, Request, SamplingParams};
use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
use lockstep_model::{Kernels, MoeCausalLm};
use lockstep_trace::pack::{pack, PackConfig, Sample};
use lockstep_trace::{ProbDtype, Probs, RouteTrace};
use lockstep_trainer::loss::{ExpertAggregation, IsCorrection, LossConfig, PiOld, RatioMode};
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::step_inputs::route_inputs;
use lockstep_trainer::trainer::{TrainBatch, Trainer, TrainerConfig};

fn model() -> MoeCausalLm {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    m
}

/// Engine rollouts at `temperature`, packed into micro-batches (advantages ±1).
fn rollouts(model: &MoeCausalLm, temperature: f32, n: usize) -> Vec<TrainBatch> {
    let reqs: Vec<Request> = (0..n)
        .map(|i| Request {
            prompt: (0..(2 + i % 5)).map(|j| ((i * 13 + j * 7 + 1) % 256) as u32).collect(),
            params: SamplingParams { seed: i as u64, max_tokens: 5, temperature, ..SamplingParams::default() },
        })
        .collect();
    let done = Engine::new(model.clone()).generate(reqs).unwrap();
    let samples: Vec<Sample> = done
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let tokens = c.sequence();
            let p = c.prompt.len();
            let mut logprobs = vec![0f32; p];
            logprobs.extend_from_slice(&c.logprobs);
            Sample {
                loss_mask: (0..tokens.len()).map(|t| t >= p).collect(),
                advantages: vec![if i % 2 == 0 { 1.0 } else { -1.0 }; tokens.len()],
                logprobs,
                routes: c.routes.clone(),
                tokens,
            }
        })
        .collect();
    let mbs = pack(&samples, &PackConfig { token_budget: 64, pad_to_multiple: 8, pad_token: 0 }).unwrap();
    mbs.iter().map(|mb| TrainBatch::from_micro_batch(mb, &Device::Cpu).unwrap()).collect()
}

fn cfg(loss: LossConfig, replay: bool, temperature: f64) -> TrainerConfig {
    TrainerConfig { loss, optimizer: AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }, replay, temperature, ..TrainerConfig::default() }
}

/// The same trace with other ids / probabilities.
fn rebuild(t: &RouteTrace, ids: Vec<u16>, probs: Vec<f32>) -> RouteTrace {
    RouteTrace::new(t.meta().clone(), t.layers().to_vec(), t.num_tokens(), ids, t.missing().to_vec(), Some(Probs::from_f32(ProbDtype::F32, &probs))).unwrap()
}

/// Per-slot Plackett–Luce log-probabilities of the old routes (every layer) for `tb`.
fn old_route_terms(model: &MoeCausalLm, tb: &TrainBatch) -> Vec<Vec<f32>> {
    let plan = lockstep_trainer::step_inputs::plan(model, tb, true).unwrap();
    let out = model.forward(&tb.batch, &plan).unwrap();
    let ri = route_inputs(model, tb, &out.routes, RatioMode::Joint(ExpertAggregation::Sum), PiOld::Infer).unwrap();
    ri.route_logp_old.iter().map(|t| t.to_vec1().unwrap()).collect()
}

/// Property, over every position p of a micro-batch and every MoE layer: scaling route row p's
/// inference probabilities by e⁻¹ changes the route term of exactly the slot whose token that
/// position predicted (p + 1, same sequence) — and nothing when p is a sequence's last token.
#[test]
fn perturbing_a_route_row_changes_exactly_the_token_it_predicted() {
    let m = model();
    let tb = &rollouts(&m, 1.0, 6)[0];
    let base = old_route_terms(&m, tb);
    let valid = tb.valid();
    let n = tb.batch.num_slots();
    let trace = tb.routes.clone().unwrap();
    let nl = trace.num_layers();
    let mut checked = 0;
    for li in 0..nl {
        for p in 0..n {
            if trace.is_missing(p) {
                continue;
            }
            let probs = trace.probs().unwrap();
            let mut v: Vec<f32> = (0..probs.len()).map(|i| probs.get_f32(i)).collect();
            for i in trace.row_range(p, li) {
                v[i] *= (-1f32).exp();
            }
            let mut t2 = tb.clone();
            t2.routes = Some(rebuild(&trace, trace.ids().to_vec(), v));
            let got = old_route_terms(&m, &t2);
            for (lj, (a, b)) in base.iter().zip(&got).enumerate() {
                for s in 0..n {
                    let should_change = lj == li && s == p + 1 && valid[s];
                    assert_eq!(a[s] != b[s], should_change, "layer index {li}, row {p}: slot {s} (layer index {lj})");
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked} rows checked");
}

#[test]
fn temperature_on_both_sides_keeps_lockstep() {
    let m = model();
    for t in [0.5f32, 1.3] {
        let tbs = rollouts(&m, t, 8);
        for ratio in [RatioMode::Token, RatioMode::Joint(ExpertAggregation::Mean)] {
            let mut tr = Trainer::new(m.clone(), cfg(LossConfig { ratio, ..LossConfig::default() }, true, t as f64)).unwrap();
            let s = tr.step(&tbs).unwrap();
            assert_eq!(s.max_abs_logprob_diff, 0.0, "T = {t}, {ratio:?}");
            assert_eq!(s.infer_kl, 0.0, "T = {t}");
            assert_eq!(s.kl, 0.0, "T = {t}, {ratio:?}: the route terms agree too");
        }
        // scored at T = 1 instead, the rollouts of T ≠ 1 are off-policy
        let mut wrong = Trainer::new(m.clone(), cfg(LossConfig::default(), true, 1.0)).unwrap();
        let s = wrong.step(&tbs).unwrap();
        assert!(s.max_abs_logprob_diff > 1e-3 && s.infer_kl > 0.0, "T = {t} scored at 1: {} / {}", s.max_abs_logprob_diff, s.infer_kl);
    }
}

#[test]
fn decoupled_ppo_centres_on_the_recomputed_old_policy() {
    let m = model();
    let mut tbs = rollouts(&m, 1.0, 8);
    // a behaviour policy that differs from the trainer's (as bf16 rollouts or another engine
    // would): every inference log-prob shifted
    for tb in &mut tbs {
        tb.logp_infer.iter_mut().zip(&tb.loss_mask).for_each(|(x, &msk)| *x -= 0.3 * msk);
    }
    let loss = LossConfig { pi_old: PiOld::Recompute, is_correction: IsCorrection::Tis { cap: 2.0 }, ..LossConfig::default() };
    let mut tr = Trainer::new(m.clone(), cfg(loss, true, 1.0)).unwrap();
    let err = tr.step(&tbs).unwrap_err().to_string();
    assert!(err.contains("Trainer::score"), "{err}");
    let sm = tr.score(&mut tbs).unwrap();
    assert!((sm.kl - ((0.3f64).exp() - 1.0 - 0.3)).abs() < 1e-4, "π_old vs π_infer: k3 of a 0.3 shift, got {}", sm.kl);
    assert!((sm.max_abs_logprob_diff - 0.3).abs() < 1e-5);
    let first = tr.step(&tbs).unwrap();
    assert_eq!(first.kl, 0.0, "π_θ = π_old before the first update");
    assert!(first.infer_kl > 0.0);
    let second = tr.step(&tbs).unwrap();
    assert!(second.kl > 0.0, "the second update is off π_old");
    // centred on π_infer instead, the same batch is off-policy from the start
    let mut tr = Trainer::new(m, cfg(LossConfig::default(), true, 1.0)).unwrap();
    assert!(tr.step(&tbs).unwrap().kl > 0.01);
}

#[test]
fn router_shift_weight_is_one_on_policy_and_below_one_after_an_update() {
    let m = model();
    let tbs = rollouts(&m, 1.0, 8);
    let loss = LossConfig { ratio: RatioMode::RouterShift { floor: 0.1 }, ..LossConfig::default() };
    let mut tr = Trainer::new(m, TrainerConfig { optimizer: AdamWConfig { lr: 3e-2, ..AdamWConfig::default() }, ..cfg(loss, true, 1.0) }).unwrap();
    let a = tr.step(&tbs).unwrap();
    assert_eq!(a.shift_weight, 1.0, "no router shift before the first update");
    let b = tr.step(&tbs).unwrap();
    assert!(b.shift_weight < 1.0 && b.shift_weight >= 0.1, "γ after an update: {}", b.shift_weight);
}

#[test]
fn kl_penalty_and_entropy_bonus_enter_the_loss() {
    let m = model();
    let tbs = rollouts(&m, 1.0, 6);
    let plain = Trainer::new(m.clone(), cfg(LossConfig::default(), true, 1.0)).unwrap().step(&tbs).unwrap();
    // at the reference itself the penalty is 0 (k3 and k1 alike) and the loss unchanged
    for est in [lockstep_trainer::loss::KlEstimator::K1, lockstep_trainer::loss::KlEstimator::K3] {
        let mut tr = Trainer::new(m.clone(), cfg(LossConfig { kl_coef: 0.5, kl_estimator: est, ..LossConfig::default() }, true, 1.0)).unwrap();
        tr.set_reference().unwrap();
        let s = tr.step(&tbs).unwrap();
        assert_eq!(s.ref_kl, 0.0);
        assert!((s.loss - plain.loss).abs() < 1e-7);
        let s2 = tr.step(&tbs).unwrap();
        assert!(s2.ref_kl != 0.0, "{est:?} after an update");
    }
    // entropy bonus: loss − c · mean H
    let c = 0.1;
    let s = Trainer::new(m, cfg(LossConfig { entropy_coef: c, ..LossConfig::default() }, true, 1.0)).unwrap().step(&tbs).unwrap();
    assert!((s.loss - (plain.loss - c * s.entropy)).abs() < 1e-5, "{} vs {} − {c}·{}", s.loss, plain.loss, s.entropy);
}

#[test]
fn gspo_on_policy_has_ratio_one_and_trains() {
    let m = model();
    let tbs = rollouts(&m, 1.0, 8);
    let loss = LossConfig { objective: lockstep_trainer::loss::Objective::Gspo { clip_low: 3e-4, clip_high: 4e-4 }, ..LossConfig::default() };
    let mut tr = Trainer::new(m, cfg(loss, true, 1.0)).unwrap();
    let a = tr.step(&tbs).unwrap();
    assert_eq!(a.kl, 0.0);
    assert_eq!(a.clip_fraction, 0.0);
    assert!(a.grad_norm > 0.0);
    let b = tr.step(&tbs).unwrap();
    assert!(b.clip_fraction > 0.0, "GSPO's narrow range clips after an update");
}

#[test]
fn joint_ratio_is_refused_without_replay_and_on_sigmoid_routers() {
    let m = model();
    let joint = LossConfig { ratio: RatioMode::Joint(ExpertAggregation::Sum), ..LossConfig::default() };
    let err = Trainer::new(m, cfg(joint, false, 1.0)).err().unwrap().to_string();
    assert!(err.contains("loss.ratio") && err.contains("replay"), "{err}");
    // GLM-4.5's router scores with a sigmoid: no route probability to take a ratio of
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fixtures/glm4_moe_tiny");
    let mut glm = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    glm.set_kernels(Kernels::Invariant);
    let err = Trainer::new(glm.clone(), cfg(joint, true, 1.0)).err().unwrap().to_string();
    assert!(err.contains("sigmoid"), "{err}");
    // router shift works there, on policy γ = 1
    let tbs = rollouts(&glm, 1.0, 4);
    let rs = LossConfig { ratio: RatioMode::RouterShift { floor: 0.1 }, ..LossConfig::default() };
    let s = Trainer::new(glm, cfg(rs, true, 1.0)).unwrap().step(&tbs).unwrap();
    assert_eq!(s.shift_weight, 1.0);
}

#[test]
fn route_agreement_compares_free_routing_with_the_inference_routes() {
    let m = model();
    let mut tbs = rollouts(&m, 1.0, 6);
    for replay in [true, false] {
        let s = Trainer::new(m.clone(), cfg(LossConfig::default(), replay, 1.0)).unwrap().step(&tbs).unwrap();
        assert!(s.layers.values().all(|l| l.route_agreement == 1.0), "replay {replay}: {:?}", s.layers);
    }
    // inference routes that differ (every real row of the first MoE layer rotated by one expert)
    let e = m.cfg.moe.router.num_experts as u16;
    let l0 = tbs[0].route_layers()[0];
    for tb in &mut tbs {
        let r = tb.routes.clone().unwrap();
        let mut ids = r.ids().to_vec();
        for t in 0..r.num_tokens() {
            if !r.is_missing(t) {
                for i in r.row_range(t, 0) {
                    ids[i] = (ids[i] + 1) % e;
                }
            }
        }
        let p = r.probs().unwrap();
        tb.routes = Some(rebuild(&r, ids, (0..p.len()).map(|i| p.get_f32(i)).collect()));
    }
    for replay in [true, false] {
        let s = Trainer::new(m.clone(), cfg(LossConfig::default(), replay, 1.0)).unwrap().step(&tbs).unwrap();
        assert!(s.layers[&l0].route_agreement < 0.5, "replay {replay}: {:?}", s.layers[&l0]);
    }
}

#[test]
fn expert_choice_routes_replay_through_the_trainer() {
    let mut m = model();
    m.set_routing(RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Block(1) }, AttentionMode::Causal, false).unwrap();
    let tbs = rollouts(&m, 1.0, 6);
    let w = tbs[0].routes.as_ref().unwrap().top_k().unwrap();
    assert_eq!(w, m.cfg.moe.router.num_experts, "block:1 expert choice: every expert takes every token");
    let mut tr = Trainer::new(m.clone(), cfg(LossConfig::default(), true, 1.0)).unwrap();
    let s = tr.step(&tbs).unwrap();
    assert_eq!(s.max_abs_logprob_diff, 0.0, "the replayed expert-choice route reproduces the engine");
    assert_eq!(s.kl, 0.0);
    assert!(s.layers.values().all(|l| l.route_agreement == 1.0));
    // router shift works for expert choice; the joint ratio is refused (no per-token draw)
    let rs = LossConfig { ratio: RatioMode::RouterShift { floor: 0.1 }, ..LossConfig::default() };
    assert_eq!(Trainer::new(m.clone(), cfg(rs, true, 1.0)).unwrap().step(&tbs).unwrap().shift_weight, 1.0);
    let joint = LossConfig { ratio: RatioMode::Joint(ExpertAggregation::Sum), ..LossConfig::default() };
    let err = Trainer::new(m, cfg(joint, true, 1.0)).err().unwrap().to_string();
    assert!(err.contains("expert choice"), "{err}");
}

/// Variable-width route rows (expert choice over whole sequences, bidirectional: a token gets
/// 0, 1 or many experts) go from a recording through packing into the trainer's replay, which
/// reproduces the recorded forward exactly.
#[test]
fn variable_width_expert_choice_rows_replay_exactly() {
    use lockstep_model::{Batch, RoutingPlan};
    let mut m = model();
    m.set_routing(RoutingStrategy::ExpertChoice { capacity_factor: 1.5, pool: Pool::Sequence }, AttentionMode::Bidirectional, false).unwrap();
    let seqs: Vec<Vec<u32>> = vec![(0..11).map(|i| (i * 7 + 3) % 256).collect(), (0..6).map(|i| (i * 13 + 1) % 256).collect()];
    let samples: Vec<Sample> = seqs
        .iter()
        .map(|s| {
            let b = Batch::packed(s, None, &[0, s.len()], &Device::Cpu).unwrap();
            let rec = m.forward(&b, &RoutingPlan::record()).unwrap();
            let (lp, _) = lockstep_model::logprobs::token_logprobs(&rec.logits, &b).unwrap();
            Sample {
                tokens: s.clone(),
                loss_mask: (0..s.len()).map(|t| t >= 2).collect(),
                advantages: vec![1.0; s.len()],
                logprobs: lp.flatten_all().unwrap().to_vec1().unwrap(),
                routes: lockstep_trainer::trainer::replay_from_recording(&rec.routes).unwrap(),
            }
        })
        .collect();
    assert!(samples.iter().all(|s| s.routes.as_ref().unwrap().is_variable()), "pools of a whole sequence give variable rows");
    let mbs = pack(&samples, &PackConfig { token_budget: 32, pad_to_multiple: 4, pad_token: 0 }).unwrap();
    assert_eq!(mbs.len(), 1);
    let tb = TrainBatch::from_micro_batch(&mbs[0], &Device::Cpu).unwrap();
    for ratio in [RatioMode::Token, RatioMode::RouterShift { floor: 0.1 }] {
        let s = Trainer::new(m.clone(), cfg(LossConfig { ratio, ..LossConfig::default() }, true, 1.0)).unwrap().step(std::slice::from_ref(&tb)).unwrap();
        assert_eq!(s.max_abs_logprob_diff, 0.0, "{ratio:?}: the replayed variable rows reproduce each sequence's forward");
        assert_eq!(s.kl, 0.0);
        assert!(s.layers.values().all(|l| l.route_agreement == 1.0), "{:?}", s.layers);
        if let RatioMode::RouterShift { .. } = ratio {
            assert_eq!(s.shift_weight, 1.0);
        }
    }
}
