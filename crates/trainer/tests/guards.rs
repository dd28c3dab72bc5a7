//! Training guards and atomic checkpoints: a non-finite loss or gradient skips the update
//! (weights, AdamW moments and step counter untouched, metrics finite); `save_with` writes extra
//! files inside the atomic checkpoint; a save that fails before its rename leaves the old
//! checkpoint intact, and stale temporary / displaced siblings are cleaned (or restored).

use candle_core::{DType, Device, Tensor};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use lockstep_trainer::checkpoint::{clean_stale_siblings, write_checkpoint_dir_inner};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{replay_from_recording, StepMetrics, TrainBatch, Trainer, TrainerConfig};

fn micro_batch(model: &MoeCausalLm) -> TrainBatch {
    let tokens: Vec<u32> = (0..14).map(|i| (i * 11 + 5) % 256).collect();
    let batch = Batch::packed(&tokens, None, &[0, 14], &Device::Cpu).unwrap();
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    let (logp, _) = token_logprobs(&rec.logits, &batch).unwrap();
    let mask: Vec<f32> = (0..14).map(|i| if i >= 5 { 1.0 } else { 0.0 }).collect();
    let adv: Vec<f32> = (0..14).map(|i| if i >= 5 { 1.0 } else { 0.0 }).collect();
    TrainBatch {
        batch,
        logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(),
        advantages: adv,
        loss_mask: mask,
        routes: replay_from_recording(&rec.routes).unwrap(),
        old: None,
    }
}

fn cfg(lr: f64) -> TrainerConfig {
    TrainerConfig { optimizer: AdamWConfig { lr, ..AdamWConfig::default() }, ..TrainerConfig::default() }
}

fn params_bits(t: &Trainer) -> Vec<Vec<u32>> {
    t.params.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()).collect()
}

fn moments_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    let bits = |p: &str, k: &String, v: &Tensor| (format!("{p}.{k}"), v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
    let mut out: Vec<(String, Vec<u32>)> = t.optimizer.m.iter().map(|(k, v)| bits("m", k, v)).chain(t.optimizer.v.iter().map(|(k, v)| bits("v", k, v))).collect();
    out.sort();
    out
}

fn all_finite(m: &StepMetrics) -> bool {
    let s = [m.loss, m.entropy, m.kl, m.max_abs_logprob_diff, m.extreme_fraction, m.clip_fraction, m.grad_norm, m.lr, m.tokens, m.fallback_tokens, m.mis_dropped, m.infer_kl, m.infer_extreme_fraction, m.ref_kl, m.shift_weight];
    s.iter().all(|x| x.is_finite())
        && m.layers.values().all(|l| [l.confidence, l.max_vio, l.max_vio_rank_max, l.route_agreement, l.max_vio_prime_rl].iter().all(|x| x.is_finite()))
}

/// Fill the named parameter with NaN.
fn poison(t: &Trainer, name_part: &str) {
    let (_, var) = t.params.iter().find(|(n, _)| n.contains(name_part)).expect("a parameter of that name");
    let n = var.as_tensor().elem_count();
    let v = vec![f32::NAN; n];
    var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap()).unwrap();
}

#[test]
fn nan_weights_skip_the_update_and_leave_the_state_untouched() {
    let model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model);
    let mut t = Trainer::new(model, cfg(1e-3)).unwrap();
    let good = t.step(std::slice::from_ref(&mb)).unwrap();
    assert!(!good.skipped_nonfinite && good.step == 1);
    poison(&t, "norm");
    let (bits, moments) = (params_bits(&t), moments_bits(&t));
    for _ in 0..3 {
        let m = t.step(std::slice::from_ref(&mb)).unwrap();
        assert!(m.skipped_nonfinite, "a NaN weight gives a NaN loss: skipped");
        assert!(all_finite(&m), "a skipped step's metrics are finite: {m:?}");
        assert_eq!(m.step, 1, "the step counter does not advance");
    }
    assert_eq!(t.optimizer.step, 1);
    assert_eq!(params_bits(&t), bits, "weights untouched");
    assert_eq!(moments_bits(&t), moments, "AdamW moments untouched");
    // the supervised step too
    let sm = t.sft_step_checked(std::slice::from_ref(&mb)).unwrap();
    assert!(sm.skipped_nonfinite && sm.loss.is_finite() && sm.grad_norm.is_finite(), "{sm:?}");
    assert_eq!(t.optimizer.step, 1);
    assert_eq!(params_bits(&t), bits);
}

#[test]
fn a_huge_lr_ends_in_skipped_steps_not_nan_weights_from_the_optimizer() {
    let model = MoeCausalLm::embedded_default(1, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model);
    let mut t = Trainer::new(model, cfg(1e30)).unwrap();
    let mut skipped = 0;
    for _ in 0..6 {
        let before = (params_bits(&t), t.optimizer.step);
        let m = t.step(std::slice::from_ref(&mb)).unwrap();
        assert!(all_finite(&m), "{m:?}");
        if m.skipped_nonfinite {
            skipped += 1;
            assert_eq!((params_bits(&t), t.optimizer.step), before, "a skipped step changes nothing");
        }
    }
    assert!(skipped > 0, "lr 1e30 must end in non-finite losses");
}

#[test]
fn save_with_puts_extra_files_in_the_atomic_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = MoeCausalLm::embedded_default(2, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model);
    let mut t = Trainer::new(model, cfg(1e-3)).unwrap();
    t.step(std::slice::from_ref(&mb)).unwrap();
    let ck = dir.path().join("step-1");
    t.save_with(&ck, &[("run_state.json", b"{\"a\":1}".to_vec())]).unwrap();
    assert_eq!(std::fs::read(ck.join("run_state.json")).unwrap(), b"{\"a\":1}");
    assert!(ck.join("model.safetensors").exists() && ck.join("optimizer.safetensors").exists() && ck.join("trainer_state.json").exists());
    assert!(t.save_with(&dir.path().join("x"), &[("../escape", vec![])]).is_err(), "extra files are plain names");

    // a save that fails after its temporary directory is complete, before the rename: the old
    // checkpoint stays as it was and resumes
    let t2_bits = params_bits(&t);
    t.step(std::slice::from_ref(&mb)).unwrap();
    let e = write_checkpoint_dir_inner(&ck, |tmp| std::fs::write(tmp.join("run_state.json"), "new"), |_| Err(std::io::Error::other("injected"))).unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(std::fs::read(ck.join("run_state.json")).unwrap(), b"{\"a\":1}", "old checkpoint intact");
    let resumed = Trainer::resume(&ck, cfg(1e-3), &Device::Cpu).unwrap();
    assert_eq!(params_bits(&resumed), t2_bits);
    assert_eq!(resumed.optimizer.step, 1);
    let stale: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.contains(".tmp-")).collect();
    assert_eq!(stale.len(), 1, "the failed save left its temporary directory: {stale:?}");
    // the next save cleans it
    t.save_with(&ck, &[("run_state.json", b"{\"a\":2}".to_vec())]).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["step-1".to_string()], "no .tmp-* / .old-* siblings left");
    assert_eq!(std::fs::read(ck.join("run_state.json")).unwrap(), b"{\"a\":2}");

    // killed between the two renames: the checkpoint sits aside as .old-*; cleaning restores it
    let old = dir.path().join(".step-1.old-12345");
    std::fs::rename(&ck, &old).unwrap();
    std::fs::create_dir(dir.path().join(".step-1.tmp-12345")).unwrap();
    clean_stale_siblings(&ck).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["step-1".to_string()]);
    assert_eq!(std::fs::read(ck.join("run_state.json")).unwrap(), b"{\"a\":2}");
    Trainer::resume(&ck, cfg(1e-3), &Device::Cpu).unwrap();
}
