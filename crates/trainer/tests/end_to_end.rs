//! Rollouts from the engine → route traces → packed micro-batches (route-transport packer) →
//! trainer step with replay. With the batch-invariant kernels on both sides the first step sees
//! exactly the inference policy: KL estimate 0, every ratio 1, every route kept.

use candle_core::{DType, Device};
use lockstep_engine::{Engine, Request, SamplingParams};
use lockstep_model::{Kernels, MoeCausalLm};
use lockstep_trace::pack::{pack, PackConfig, Sample};
use lockstep_trainer::loss::{ExpertAggregation, LossConfig, RatioMode};
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{TrainBatch, Trainer, TrainerConfig};

#[test]
fn engine_rollouts_train_on_policy_bit_for_bit() {
    let mut model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    model.set_kernels(Kernels::Invariant);
    let reqs: Vec<Request> = (0..12)
        .map(|i| Request {
            prompt: (0..(2 + i % 7)).map(|j| ((i * 13 + j * 7 + 1) % 256) as u32).collect(),
            params: SamplingParams { seed: i as u64, max_tokens: 6, ..SamplingParams::default() },
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
                // every third sample without routes: token-only fallback
                routes: if i % 3 == 2 { None } else { c.routes.clone() },
                tokens,
            }
        })
        .collect();
    let mbs = pack(&samples, &PackConfig { token_budget: 48, pad_to_multiple: 8, pad_token: 0 }).unwrap();
    assert!(mbs.len() > 1, "several micro-batches");
    let tbs: Vec<TrainBatch> = mbs.iter().map(|mb| TrainBatch::from_micro_batch(mb, &Device::Cpu).unwrap()).collect();
    for ratio in [RatioMode::Token, RatioMode::Joint(ExpertAggregation::Sum)] {
        let cfg = TrainerConfig { loss: LossConfig { ratio, ..LossConfig::default() }, optimizer: AdamWConfig::default(), replay: true, temperature: 1.0, ..TrainerConfig::default() };
        let mut t = Trainer::new(model.clone(), cfg).unwrap();
        let m = t.step(&tbs).unwrap();
        assert_eq!(m.kl, 0.0, "{ratio:?}: on-policy means ρ = 1 exactly");
        assert_eq!(m.extreme_fraction, 0.0);
        assert_eq!(m.max_abs_logprob_diff, 0.0, "{ratio:?}: the trainer reproduces the engine's log-probabilities");
        assert_eq!(m.tokens, 12.0 * 6.0);
        assert!(m.layers.values().all(|l| l.route_agreement == 1.0), "{:?}", m.layers);
        if matches!(ratio, RatioMode::Joint(_)) {
            assert_eq!(m.fallback_tokens, 4.0 * 6.0, "samples without routes fall back to token mode");
        }
    }
}
