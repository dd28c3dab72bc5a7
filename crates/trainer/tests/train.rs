//! Trainer steps: the objective goes down, checkpoints round-trip bitwise, resume equals an
//! uninterrupted run bit for bit, replay on / off and joint mode run with sane metrics.

use candle_core::{DType, Device};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::loss::{ExpertAggregation, LossConfig, RatioMode};
use lockstep_trainer::optim::{AdamWConfig, Schedule};
use lockstep_trainer::trainer::{replay_from_recording, TrainBatch, Trainer, TrainerConfig};

/// Two sequences packed in one row (+2 padding slots); the inference side is the model itself.
fn micro_batch(model: &MoeCausalLm, with_routes: bool) -> TrainBatch {
    let seqs: Vec<Vec<u32>> = vec![(0..14).map(|i| (i * 11 + 5) % 256).collect(), (0..9).map(|i| (i * 17 + 2) % 256).collect()];
    let prompt = [5usize, 3];
    let tokens: Vec<u32> = seqs.concat().into_iter().chain([0, 0]).collect();
    let cu = vec![0, 14, 23];
    let batch = Batch::packed(&tokens, None, &cu, &Device::Cpu).unwrap();
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    let (logp, _) = token_logprobs(&rec.logits, &batch).unwrap();
    let n = tokens.len();
    let mut mask = vec![0f32; n];
    let mut adv = vec![0f32; n];
    for (s, w) in cu.windows(2).enumerate() {
        for i in w[0] + prompt[s]..w[1] {
            mask[i] = 1.0;
            adv[i] = if s == 0 { 1.0 } else { -0.5 };
        }
    }
    TrainBatch {
        batch,
        logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(),
        advantages: adv,
        loss_mask: mask,
        routes: if with_routes { replay_from_recording(&rec.routes).unwrap() } else { None },
        old: None,
    }
}

fn cfg(replay: bool, ratio: RatioMode) -> TrainerConfig {
    TrainerConfig {
        loss: LossConfig { ratio, ..LossConfig::default() },
        optimizer: AdamWConfig { lr: 3e-3, warmup_steps: 2, schedule: Schedule::Cosine { total_steps: 20, min_lr_ratio: 0.1 }, weight_decay: 0.01, ..AdamWConfig::default() },
        replay,
        temperature: 1.0,
        ..TrainerConfig::default()
    }
}

fn params_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()))
        .collect()
}

#[test]
fn steps_lower_a_fixed_objective() {
    let model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model, true);
    let mut t = Trainer::new(model, cfg(true, RatioMode::Token)).unwrap();
    let first = t.step(std::slice::from_ref(&mb)).unwrap();
    assert!((first.kl).abs() < 1e-9, "same weights, replayed routes: ρ = 1 (kl {})", first.kl);
    assert!(first.layers.values().all(|l| l.route_agreement == 1.0));
    assert_eq!(first.tokens, (14 - 5 + 9 - 3) as f64);
    let mut last = first.clone();
    for _ in 0..7 {
        last = t.step(std::slice::from_ref(&mb)).unwrap();
    }
    // with a fixed batch the PPO objective's value at ρ = 1 is −mean(A); a better policy lowers
    // the loss (ρ > 1 where A > 0, ρ < 1 where A < 0, within the clip range)
    assert!(last.loss < first.loss - 1e-3, "loss {} → {}", first.loss, last.loss);
    assert!(first.grad_norm > 0.0 && last.kl > 0.0 && last.entropy > 0.0);
    // once every token sits outside the clip range the PPO gradient vanishes
    assert!(last.clip_fraction > first.clip_fraction);
    assert_eq!(last.step, 8);
}

#[test]
fn resume_equals_uninterrupted_and_checkpoints_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let model = MoeCausalLm::embedded_default(1, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model, true);
    let c = cfg(true, RatioMode::Joint(ExpertAggregation::Sum));
    let mut straight = Trainer::new(model.clone(), c).unwrap();
    let mut first_half = Trainer::new(model, c).unwrap();
    for _ in 0..2 {
        straight.step(std::slice::from_ref(&mb)).unwrap();
        first_half.step(std::slice::from_ref(&mb)).unwrap();
    }
    let ck = dir.path().join("step-2");
    first_half.save(&ck).unwrap();
    let mut resumed = Trainer::resume(&ck, c, &Device::Cpu).unwrap();
    assert_eq!(params_bits(&resumed), params_bits(&first_half), "save → load is bitwise");
    assert_eq!(resumed.optimizer.step, 2);
    for _ in 0..2 {
        let a = straight.step(std::slice::from_ref(&mb)).unwrap();
        let b = resumed.step(std::slice::from_ref(&mb)).unwrap();
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    }
    assert_eq!(params_bits(&straight), params_bits(&resumed), "resume continues bit for bit");
    // the checkpoint is a plain HF directory: the model loads on its own
    let again = MoeCausalLm::load(&ck, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(again.cfg.moe_layers, vec![0, 1, 3]);
    assert!(ck.join("model.safetensors").exists() && ck.join("optimizer.safetensors").exists());
}

#[test]
fn replay_off_and_missing_routes_fall_back() {
    let model = MoeCausalLm::embedded_default(2, DType::F32, &Device::Cpu).unwrap();
    let with = micro_batch(&model, true);
    let without = micro_batch(&model, false);
    let mut t = Trainer::new(model.clone(), cfg(false, RatioMode::Token)).unwrap();
    let m = t.step(std::slice::from_ref(&with)).unwrap();
    assert_eq!(m.fallback_tokens, 0.0);
    let mut j = Trainer::new(model, cfg(true, RatioMode::Joint(ExpertAggregation::Mean))).unwrap();
    let m = j.step(&[with, without]).unwrap();
    assert_eq!(m.fallback_tokens, 15.0, "the sample without routes counts as fallback");
    assert_eq!(m.tokens, 30.0);
}
