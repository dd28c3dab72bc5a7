//! One train step (forward + backward + AdamW) on the embedded default, tokens/s with replay
//! (forced recorded routes, recomputed weights) and without (free routing), token and joint
//! ratio. `cargo bench -p lockstep-trainer --bench train_step` (median of 5 after 1 warm-up).

use std::time::Instant;

use candle_core::{DType, Device};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::loss::{ExpertAggregation, LossConfig, RatioMode};
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{replay_from_recording, TrainBatch, Trainer, TrainerConfig};

fn main() {
    let dev = Device::Cpu;
    let model = MoeCausalLm::embedded_default(0, DType::F32, &dev).unwrap();
    let (seqs, len) = (8usize, 128usize);
    let tokens: Vec<u32> = (0..seqs * len).map(|i| ((i * 37 + i / len * 11) % 256) as u32).collect();
    let cu: Vec<usize> = (0..=seqs).map(|s| s * len).collect();
    let batch = Batch::packed(&tokens, None, &cu, &dev).unwrap();
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    let (logp, valid) = token_logprobs(&rec.logits, &batch).unwrap();
    let mb = TrainBatch {
        logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(),
        advantages: (0..tokens.len()).map(|i| if (i / len) % 2 == 0 { 1.0 } else { -1.0 }).collect(),
        loss_mask: valid.iter().map(|&v| f32::from(u8::from(v))).collect(),
        routes: replay_from_recording(&rec.routes).unwrap(),
        batch,
        old: None,
    };
    println!("embedded default, one micro-batch of {seqs} x {len} packed tokens, CPU f32");
    for (name, replay, ratio) in [
        ("free routing, token ratio", false, RatioMode::Token),
        ("replay, token ratio", true, RatioMode::Token),
        ("replay, joint ratio", true, RatioMode::Joint(ExpertAggregation::Sum)),
    ] {
        let cfg = TrainerConfig { loss: LossConfig { ratio, ..LossConfig::default() }, optimizer: AdamWConfig::default(), replay, temperature: 1.0, ..TrainerConfig::default() };
        let mut t = Trainer::new(model.clone(), cfg).unwrap();
        t.step(std::slice::from_ref(&mb)).unwrap();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let s = Instant::now();
                t.step(std::slice::from_ref(&mb)).unwrap();
                s.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[2];
        println!("{name:<28} {:>8.0} tokens/s  ({:.1} ms / step)", tokens.len() as f64 / med, med * 1e3);
    }
}
