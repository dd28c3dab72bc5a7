//! Train a few steps on several models, save each as a lockstep checkpoint, and write the
//! logits lockstep computes for fixed inputs beside it (`lockstep_logits.safetensors`), so
//! `scripts/check_hf_load.py` can load the checkpoints in transformers and compare.
//!
//!     cargo run --release -p lockstep-trainer --example export_for_hf -- OUT_DIR

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::loss::LossConfig;
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{replay_from_recording, TrainBatch, Trainer, TrainerConfig};

fn train_batch(model: &MoeCausalLm) -> TrainBatch {
    let v = model.cfg.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 7 + 3) % v).collect(), (0..9).map(|i| (i * 13 + 1) % v).collect()];
    let batch = Batch::from_sequences(&seqs, 0, &Device::Cpu).unwrap();
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    let (logp, valid) = token_logprobs(&rec.logits, &batch).unwrap();
    let n = batch.num_slots();
    TrainBatch {
        logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(),
        advantages: (0..n).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect(),
        loss_mask: valid.iter().map(|&x| f32::from(u8::from(x))).collect(),
        routes: replay_from_recording(&rec.routes).unwrap(),
        batch,
        old: None,
    }
}

fn export(name: &str, model: MoeCausalLm, out: &Path) {
    let cfg = TrainerConfig { loss: LossConfig::default(), optimizer: AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }, replay: true, temperature: 1.0, ..TrainerConfig::default() };
    let mb = train_batch(&model);
    let mut t = Trainer::new(model, cfg).unwrap();
    for _ in 0..3 {
        t.step(std::slice::from_ref(&mb)).unwrap();
    }
    let dir = out.join(name);
    t.model.save(&dir).unwrap();
    let v = t.model.cfg.vocab_size as u32;
    let ids: Vec<Vec<u32>> = (0..2).map(|r| (0..17).map(|i| (i * 29 + r * 101 + 7) % v).collect()).collect();
    let batch = Batch::padded(&ids, &vec![vec![1; 17]; 2], &Device::Cpu).unwrap();
    let reloaded = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let logits = reloaded.forward(&batch, &RoutingPlan::compute()).unwrap().logits;
    let mut ts = HashMap::new();
    ts.insert("input_ids".to_string(), batch.input_ids_BT.to_dtype(DType::I64).unwrap());
    ts.insert("logits".to_string(), logits);
    candle_core::safetensors::save(&ts, dir.join("lockstep_logits.safetensors")).unwrap();
    println!("saved {}", dir.display());
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: export_for_hf OUT_DIR"));
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    export("default", MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap(), &out);
    for (name, dir) in [
        ("qwen2_moe_tiny", fx.join("fixtures/qwen2_moe_tiny")),
        ("glm4_moe_tiny", fx.join("fixtures/glm4_moe_tiny")),
        ("qwen3_moe_dense_gaps", fx.join("extra_fixtures/qwen3_moe_dense_gaps")),
    ] {
        export(name, MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap(), &out);
    }
}
