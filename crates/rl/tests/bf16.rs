//! `[model] dtype = "bf16"`: the trainer and the in-process engine in bf16 (f32 master weights),
//! the engine's log-probs still the trainer's bit for bit with the batch-invariant kernels (at
//! any LM-head chunk size); with activation checkpointing the run is bitwise the run without;
//! resume of a bf16 run continues bit for bit (its checkpoint holds the f32 master weights).

use lockstep_rl::config::RunConfig;
use lockstep_rl::{run, RunOptions, RunSummary};

fn short(out: &std::path::Path, steps: u64, dtype: &str) -> RunConfig {
    let mut c = RunConfig::default_config();
    c.steps = steps;
    c.warmup.steps = 30;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.eval.every = 2;
    c.model.dtype = dtype.to_string();
    c.output.dir = out.display().to_string();
    c.output.checkpoint_every = 2;
    c
}

fn key(s: &RunSummary) -> Vec<(u64, u64, u64, u64)> {
    s.records.iter().filter(|r| r.phase == "rl").map(|r| (r.step, r.reward_mean.to_bits(), r.loss.to_bits(), r.kl.to_bits())).collect()
}

#[test]
fn bf16_runs_in_lockstep_and_checkpointing_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("plain");
    let plain = run(&short(&a, 4, "bf16"), &a, true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = plain.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 4);
    for r in &rl {
        assert_eq!(r.train_infer_logprob_diff_max, 0.0, "step {}: engine and trainer agree bit for bit in bf16", r.step);
        assert!(r.loss.is_finite() && r.grad_norm.is_finite() && r.skipped_nonfinite == 0, "step {}: {r:?}", r.step);
    }
    assert!(rl.iter().any(|r| r.grad_norm > 0.0), "some update moved the weights: {rl:?}");
    let b = dir.path().join("checkpointed");
    let mut c = short(&b, 4, "bf16");
    c.trainer.activation_checkpointing = true;
    let checkpointed = run(&c, &b, true, &RunOptions::default()).unwrap();
    assert_eq!(key(&plain), key(&checkpointed), "activation checkpointing: the same run bit for bit");
    // smaller LM-head chunks: the log-probs stay the engine's bit for bit (the head-weight
    // gradient is summed chunk by chunk, so the run itself may round differently)
    let c5 = dir.path().join("chunked");
    let mut c = short(&c5, 2, "bf16");
    c.trainer.logits_chunk_tokens = 5;
    let chunked = run(&c, &c5, true, &RunOptions::default()).unwrap();
    assert!(chunked.records.iter().filter(|r| r.phase == "rl").all(|r| r.train_infer_logprob_diff_max == 0.0 && r.old_infer_logprob_diff_max == 0.0));
    // f32 and bf16 differ (the dtype is really applied)
    let f = dir.path().join("f32");
    let f32_run = run(&short(&f, 4, "f32"), &f, true, &RunOptions::default()).unwrap();
    assert_ne!(key(&plain), key(&f32_run));
}

#[test]
fn bf16_resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let straight = run(&short(&a, 4, "bf16"), &a, true, &RunOptions::default()).unwrap();
    let b = dir.path().join("b");
    run(&short(&b, 2, "bf16"), &b, true, &RunOptions::default()).unwrap();
    let resumed = run(&short(&b, 4, "bf16"), &b, true, &RunOptions { resume: Some(b.join("checkpoints/step-2")), ..RunOptions::default() }).unwrap();
    let tail = |s: &RunSummary| key(s).into_iter().filter(|k| k.0 > 2).collect::<Vec<_>>();
    assert_eq!(tail(&straight), tail(&resumed));
    // the checkpoint's weights are the f32 masters
    let m = lockstep_model::MoeCausalLm::load(&b.join("checkpoints/step-2"), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m.dtype(), candle_core::DType::F32);
    let st = candle_core::safetensors::load(b.join("checkpoints/step-2/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(st.values().all(|t| t.dtype() == candle_core::DType::F32), "a bf16 run saves its f32 master weights");
}
