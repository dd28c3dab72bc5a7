//! The staged forward / backward (`lockstep_trainer::staged`): activation checkpointing gives
//! bitwise the same gradients and updates as keeping every layer's graph; chunked log-probs equal
//! unchunked ones bitwise (batch-invariant kernels) and the whole-forward log-probs; the staged
//! gradient equals the whole-graph gradient of the same loss within f32 rounding.

use candle_core::{DType, Device, Tensor};
use lockstep_model::{Batch, Kernels, MoeCausalLm, RoutingPlan};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::loss::{ExpertAggregation, LossConfig, PiOld, RatioMode};
use lockstep_trainer::optim::{AdamWConfig, GradAccumulator};
use lockstep_trainer::staged::{GradTargets, StageOptions, Staged};
use lockstep_trainer::trainer::{replay_from_recording, TrainBatch, Trainer, TrainerConfig};

/// Three sequences packed in one row (+1 padding slot); the inference side is the model itself.
fn micro_batch(model: &MoeCausalLm) -> TrainBatch {
    let seqs: Vec<Vec<u32>> = vec![
        (0..13).map(|i| (i * 11 + 5) % 256).collect(),
        (0..7).map(|i| (i * 17 + 2) % 256).collect(),
        (0..10).map(|i| (i * 29 + 7) % 256).collect(),
    ];
    let prompt = [4usize, 3, 2];
    let tokens: Vec<u32> = seqs.concat().into_iter().chain([0]).collect();
    let cu = vec![0, 13, 20, 30];
    let batch = Batch::packed(&tokens, None, &cu, &Device::Cpu).unwrap();
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    let (logp, _) = token_logprobs(&rec.logits, &batch).unwrap();
    let n = tokens.len();
    let (mut mask, mut adv) = (vec![0f32; n], vec![0f32; n]);
    for (s, w) in cu.windows(2).enumerate() {
        for i in w[0] + prompt[s]..w[1] {
            mask[i] = 1.0;
            adv[i] = [1.0, -0.5, 0.25][s];
        }
    }
    TrainBatch {
        batch,
        logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(),
        advantages: adv,
        loss_mask: mask,
        routes: replay_from_recording(&rec.routes).unwrap(),
        old: None,
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn params_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.params
        .iter()
        .map(|(n, v)| (n.clone(), bits(v.as_tensor())))
        .collect()
}

fn loss_cfg(ratio: RatioMode) -> LossConfig {
    LossConfig {
        ratio,
        entropy_coef: 0.01,
        kl_coef: 0.05,
        pi_old: PiOld::Recompute,
        ..LossConfig::default()
    }
}

fn trainer_in(
    model: &MoeCausalLm,
    ratio: RatioMode,
    checkpoint: bool,
    chunk: usize,
    dtype: DType,
) -> Trainer {
    let cfg = TrainerConfig {
        dtype,
        loss: loss_cfg(ratio),
        optimizer: AdamWConfig {
            lr: 3e-3,
            ..AdamWConfig::default()
        },
        activation_checkpointing: checkpoint,
        logits_chunk_tokens: chunk,
        ..TrainerConfig::default()
    };
    let mut t = Trainer::new(model.clone(), cfg).unwrap();
    t.set_reference().unwrap();
    t
}

#[test]
fn checkpointing_gives_bitwise_the_same_steps() {
    for (kernels, dtype) in [
        (Kernels::Autograd, DType::F32),
        (Kernels::Invariant, DType::F32),
        (Kernels::Invariant, DType::BF16),
    ] {
        for ratio in [RatioMode::Token, RatioMode::Joint(ExpertAggregation::Sum)] {
            let mut model = MoeCausalLm::embedded_default(3, DType::F32, &Device::Cpu).unwrap();
            model.set_kernels(kernels);
            let mb = micro_batch(&model);
            let mut kept = trainer_in(&model, ratio, false, 7, dtype);
            let mut recomputed = trainer_in(&model, ratio, true, 7, dtype);
            for step in 0..3 {
                let (mut a, mut b) = (vec![mb.clone()], vec![mb.clone()]);
                kept.score(&mut a).unwrap();
                recomputed.score(&mut b).unwrap();
                let ma = kept.step(&a).unwrap();
                let mb_ = recomputed.step(&b).unwrap();
                assert_eq!(
                    ma.loss.to_bits(),
                    mb_.loss.to_bits(),
                    "{kernels:?} {dtype:?} {ratio:?} step {step}: loss"
                );
                assert_eq!(
                    ma.grad_norm.to_bits(),
                    mb_.grad_norm.to_bits(),
                    "{kernels:?} {dtype:?} {ratio:?} step {step}: grad norm"
                );
                assert!(ma.grad_norm > 0.0 && ma.entropy > 0.0);
                assert_eq!(
                    params_bits(&kept),
                    params_bits(&recomputed),
                    "{kernels:?} {dtype:?} {ratio:?} step {step}: weights"
                );
            }
        }
    }
}

#[test]
fn chunked_logprobs_equal_unchunked_and_the_whole_forward() {
    for dtype in [DType::F32, DType::BF16] {
        let mut model = MoeCausalLm::embedded_default(4, DType::F32, &Device::Cpu).unwrap();
        model.cast(dtype).unwrap();
        model.set_kernels(Kernels::Invariant);
        let mb = micro_batch(&model);
        let plan = RoutingPlan::record();
        let whole = model.forward(&mb.batch, &plan).unwrap();
        let (reference, _) = token_logprobs(&whole.logits, &mb.batch).unwrap();
        for chunk in [0, 1, 5, 8, 31, 1024] {
            let opts = StageOptions {
                checkpoint: false,
                chunk_tokens: chunk,
                temperature: 1.0,
            };
            let s = Staged::forward(&model, &mb.batch, &plan, opts, false, GradTargets::none())
                .unwrap();
            assert_eq!(bits(&s.logp), bits(&reference), "{dtype:?} chunk {chunk}");
            let t = Staged::forward(
                &model,
                &mb.batch,
                &plan,
                StageOptions {
                    temperature: 0.7,
                    ..opts
                },
                false,
                GradTargets::none(),
            )
            .unwrap();
            let (at_t, _) = token_logprobs(
                &lockstep_model::logprobs::at_temperature(&whole.logits, 0.7).unwrap(),
                &mb.batch,
            )
            .unwrap();
            assert_eq!(bits(&t.logp), bits(&at_t), "chunk {chunk}, T = 0.7");
        }
        // the trainer's π_old scoring is the engine-side arithmetic, chunked or not
        let mut a = vec![mb.clone()];
        let mut b = vec![mb];
        trainer_in(&model, RatioMode::Token, false, 0, dtype)
            .score(&mut a)
            .unwrap();
        trainer_in(&model, RatioMode::Token, true, 3, dtype)
            .score(&mut b)
            .unwrap();
        let (oa, ob) = (a[0].old.as_ref().unwrap(), b[0].old.as_ref().unwrap());
        assert_eq!(
            oa.logp.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            ob.logp.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(oa.route_probs, ob.route_probs);
    }
}

/// The staged backward of a simple loss against candle's whole-graph backward of the same loss.
#[test]
fn staged_gradients_equal_the_whole_graph() {
    let model = MoeCausalLm::embedded_default(5, DType::F32, &Device::Cpu).unwrap();
    let t = Trainer::new(model, TrainerConfig::default()).unwrap();
    let mb = micro_batch(&t.model);
    let plan = lockstep_trainer::step_inputs::plan(&t.model, &mb, true).unwrap();
    let w = Tensor::from_vec(
        mb.advantages
            .iter()
            .zip(&mb.loss_mask)
            .map(|(a, m)| a * m)
            .collect::<Vec<f32>>(),
        mb.advantages.len(),
        &Device::Cpu,
    )
    .unwrap();
    // whole graph
    let out = t.model.forward(&mb.batch, &plan).unwrap();
    let (lp, _) = token_logprobs(&out.logits, &mb.batch).unwrap();
    let loss = (lp.flatten_all().unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let mut whole = GradAccumulator::default();
    whole.add(&t.params, &loss.backward().unwrap()).unwrap();
    // staged, checkpointed, chunked
    let opts = StageOptions {
        checkpoint: true,
        chunk_tokens: 4,
        temperature: 1.0,
    };
    let s = Staged::forward(&t.model, &mb.batch, &plan, opts, true, GradTargets::none()).unwrap();
    let loss2 = (&s.logp * &w).unwrap().sum_all().unwrap().neg().unwrap();
    assert_eq!(
        loss.to_scalar::<f32>().unwrap().to_bits(),
        loss2.to_scalar::<f32>().unwrap().to_bits()
    );
    let mut staged = GradAccumulator::default();
    s.backward(&loss2, &t.params, &mut staged).unwrap();
    let mut compared = 0;
    for (name, _) in &t.params {
        let (Some(a), Some(b)) = (whole.get(name), staged.get(name)) else {
            assert!(
                whole.get(name).is_none() && staged.get(name).is_none(),
                "{name}: a gradient on one side only"
            );
            continue;
        };
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max |Δ| {diff} (scale {scale})"
        );
        compared += 1;
    }
    assert!(
        compared >= t.params.len() - 2,
        "{compared} of {} parameters compared",
        t.params.len()
    );
}

/// The head run only at the loss-weighed slots (`Staged::forward_scored`, what the trainer
/// does) gives bitwise the full head's log-probabilities and entropies there (batch-invariant
/// kernels), 0 at every other slot, and the gradients of a loss over those slots within f32
/// rounding of the full head's (the LM head's weight gradient sums fewer rows).
#[test]
fn scored_slots_head_equals_the_full_head_where_scored() {
    for dtype in [DType::F32, DType::BF16] {
        let mut model = MoeCausalLm::embedded_default(4, DType::F32, &Device::Cpu).unwrap();
        model.cast(dtype).unwrap();
        model.set_kernels(Kernels::Invariant);
        let t = Trainer::new(model, TrainerConfig::default()).unwrap();
        let model = &t.model;
        let mb = micro_batch(model);
        let scored = mb.scored_slots();
        assert!(scored.iter().any(|&s| !s) && scored.iter().any(|&s| s));
        let plan = lockstep_trainer::step_inputs::plan(model, &mb, true).unwrap();
        for (checkpoint, chunk) in [(false, 0), (true, 3), (true, 1024)] {
            let opts = StageOptions { checkpoint, chunk_tokens: chunk, temperature: 0.8 };
            let targets = GradTargets { entropy: true, router_scores: false };
            let full = Staged::forward(model, &mb.batch, &plan, opts, true, targets).unwrap();
            let part = Staged::forward_scored(model, &mb.batch, &plan, opts, true, targets, Some(&scored)).unwrap();
            let (fl, pl) = (bits(&full.logp), bits(&part.logp));
            let (fh, ph) = (bits(&full.entropy), bits(&part.entropy));
            let mut nonzero = 0;
            for n in 0..scored.len() {
                if scored[n] && full.valid[n] {
                    assert_eq!((pl[n], ph[n]), (fl[n], fh[n]), "{dtype:?} slot {n}");
                    nonzero += usize::from(pl[n] != 0);
                } else {
                    assert_eq!((pl[n], ph[n]), (0, 0), "{dtype:?} unscored slot {n}");
                }
            }
            assert!(nonzero > 10, "{nonzero} scored slots");
            let w = Tensor::from_vec(mb.loss_mask.iter().zip(&mb.advantages).map(|(m, a)| m * a).collect::<Vec<f32>>(), scored.len(), &Device::Cpu).unwrap();
            let loss = |s: &Staged| ((&s.logp * &w).unwrap().sum_all().unwrap() + (&s.entropy * &w).unwrap().sum_all().unwrap() * 0.1).unwrap();
            let (lf, lp) = (loss(&full), loss(&part));
            assert_eq!(lf.to_scalar::<f32>().unwrap().to_bits(), lp.to_scalar::<f32>().unwrap().to_bits(), "{dtype:?}: loss");
            let (mut ga, mut gb) = (GradAccumulator::default(), GradAccumulator::default());
            full.backward(&lf, &t.params, &mut ga).unwrap();
            part.backward(&lp, &t.params, &mut gb).unwrap();
            let mut compared = 0;
            for (name, _) in &t.params {
                let (Some(a), Some(b)) = (ga.get(name), gb.get(name)) else {
                    assert!(ga.get(name).is_none() && gb.get(name).is_none(), "{name}: a gradient on one side only");
                    continue;
                };
                let max = |x: &Tensor| x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let (scale, diff) = (max(a).max(1e-6), max(&(a - b).unwrap()));
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(diff <= tol * scale, "{dtype:?} {name}: max |Δ| {diff} (scale {scale})");
                compared += 1;
            }
            assert!(compared >= t.params.len() - 2, "{compared} of {} compared", t.params.len());
        }
    }
}
