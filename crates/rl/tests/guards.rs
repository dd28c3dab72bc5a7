//! Training guards of the RL loop: NaN weights skip every update, the run stops after
//! `trainer.max_nonfinite_steps` in a row naming its intact last checkpoint, metrics hold no
//! null; resume state is range-checked; a torn last metrics line is dropped; checkpoints always
//! hold run_state.json and leave no temporary siblings.

use std::path::Path;

use candle_core::{Device, Tensor};
use lockstep_rl::config::RunConfig;
use lockstep_rl::metrics::{self, LayerRecord, StepRecord};
use lockstep_rl::{run, RlError, RunOptions};

fn short(out: &Path, steps: u64) -> RunConfig {
    let mut c = RunConfig::default_config();
    c.steps = steps;
    c.warmup.steps = 4;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.eval.every = 2;
    c.output.dir = out.display().to_string();
    c.output.checkpoint_every = 2;
    c
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap())).collect();
    v.sort();
    v
}

#[test]
fn nan_weights_are_refused_at_resume_and_the_good_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut cfg = short(&out, 2);
    assert_eq!(cfg.trainer.max_nonfinite_steps, 3, "default");
    run(&cfg, &out, true, &RunOptions::default()).unwrap();
    // every checkpoint directory holds run_state.json; no temporary / displaced siblings
    let cks = out.join("checkpoints");
    for e in std::fs::read_dir(&cks).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        assert!(!name.starts_with('.'), "stale sibling {name}");
        assert!(e.path().join("run_state.json").exists(), "{name} without run_state.json");
    }
    let good = cks.join("step-2");

    // a copy of the checkpoint with NaN weights (final norm): every update is skipped
    let bad = tmp.path().join("poisoned");
    copy_dir(&good, &bad);
    let st = bad.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let w = tensors.get_mut("model.norm.weight").expect("a final norm");
    *w = Tensor::full(f32::NAN, w.shape(), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&tensors, &st).unwrap();

    cfg.steps = 6;
    // the copy still carries the checkpoint's manifest: the rewritten weights are refused by
    // their checksum, naming the file
    let err = run(&cfg, &out, true, &RunOptions { resume: Some(bad.clone()), ..RunOptions::default() }).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("lockstep-manifest.json") && err.contains("poisoned"), "{err}");
    // without it (a foreign checkpoint) the NaN weights themselves are refused
    std::fs::remove_file(bad.join("lockstep-manifest.json")).unwrap();
    let before = dir_bytes(&bad);

    // refused at load, naming the tensor and the checkpoint, before any step (the path where
    // updates go non-finite during a run is `a_huge_lr_stops_the_run`'s)
    let err = run(&cfg, &out, true, &RunOptions { resume: Some(bad.clone()), ..RunOptions::default() }).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("model.norm.weight") && msg.contains("NaN or infinite") && msg.contains("poisoned"), "{msg}");
    assert_eq!(dir_bytes(&bad), before, "the named checkpoint is untouched");
    assert!(!cks.join("step-3").exists(), "no step ran");

    // the good checkpoint resumes and finishes the run
    cfg.steps = 4;
    let s = run(&cfg, &out, true, &RunOptions { resume: Some(good), ..RunOptions::default() }).unwrap();
    assert!(s.records.iter().filter(|r| r.phase == "rl").all(|r| r.skipped_nonfinite == 0 && r.updates == 2));
    assert!(cks.join("step-4/run_state.json").exists());
}

#[test]
fn resume_state_is_range_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = short(&out, 4);
    let ck = tmp.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    let try_state = |json: &str| {
        std::fs::write(ck.join("run_state.json"), json).unwrap();
        let e = run(&cfg, &out, true, &RunOptions { resume: Some(ck.clone()), ..RunOptions::default() }).unwrap_err().to_string();
        eprintln!("{e}");
        assert!(e.contains("run_state.json"), "{e}");
        e
    };
    assert!(try_state(r#"{"rl_step":18446744073709551615,"warmup_eval":0.5}"#).contains("`rl_step`"));
    assert!(try_state(r#"{"rl_step":1000000000,"warmup_eval":0.5}"#).contains("`rl_step`"));
    assert!(try_state(r#"{"rl_step":5,"warmup_eval":0.5}"#).contains("`rl_step`"));
    assert!(try_state(r#"{"rl_step":0,"warmup_eval":0.0,"warmup_step":1000000000}"#).contains("`warmup_step`"));
    assert!(try_state(r#"{"rl_step":0,"warmup_eval":0.0,"warmup_step":4}"#).contains("`warmup_step`"));
    try_state(r#"{"rl_step":-1,"warmup_eval":0.0}"#);
}

#[test]
fn max_nonfinite_steps_is_optional_and_validated() {
    let text = lockstep_rl::config::DEFAULT_TOML;
    assert!(text.contains("max_nonfinite_steps = 3"));
    let without = text.replace("max_nonfinite_steps = 3\n", "");
    assert_eq!(RunConfig::from_toml(&without).unwrap().trainer.max_nonfinite_steps, 3);
    let e = RunConfig::from_toml(&text.replace("max_nonfinite_steps = 3", "max_nonfinite_steps = 0")).unwrap_err().to_string();
    assert!(e.contains("trainer.max_nonfinite_steps"), "{e}");
    assert_eq!(RunConfig::from_toml(&text.replace("max_nonfinite_steps = 3", "max_nonfinite_steps = 7")).unwrap().trainer.max_nonfinite_steps, 7);
}

#[test]
fn metrics_refuse_non_finite_and_drop_a_torn_last_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let rec = |step| StepRecord { phase: "rl".into(), step, reward_mean: 0.5, ..StepRecord::default() };
    metrics::append(&path, &rec(1)).unwrap();
    metrics::append(&path, &rec(2)).unwrap();
    let e = metrics::append(&path, &StepRecord { loss: f64::NAN, ..rec(3) }).unwrap_err().to_string();
    assert!(e.contains("`loss`") && e.contains("not finite"), "{e}");
    let mut layered = rec(3);
    layered.layers.insert(1, LayerRecord { confidence: f64::INFINITY, ..LayerRecord::default() });
    let e = metrics::append(&path, &layered).unwrap_err().to_string();
    assert!(e.contains("layers.1.confidence"), "{e}");
    assert!(metrics::append(&path, &StepRecord { eval_accuracy: Some(f64::NAN), ..rec(3) }).is_err());
    assert_eq!(metrics::read(&path).unwrap().len(), 2, "nothing written by the refused appends");

    // a kill in the middle of an append: the torn last line is dropped
    let good = std::fs::read_to_string(&path).unwrap();
    let line3 = serde_json::to_string(&rec(3)).unwrap();
    std::fs::write(&path, format!("{good}{}", &line3[..line3.len() / 2])).unwrap();
    assert_eq!(metrics::read(&path).unwrap().iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2]);
    // also with its newline written but the JSON cut short
    std::fs::write(&path, format!("{good}{}\n", &line3[..10])).unwrap();
    assert_eq!(metrics::read(&path).unwrap().len(), 2);
    // a bad line in the middle is an error naming it
    let lines: Vec<&str> = good.lines().collect();
    std::fs::write(&path, format!("{}\n{{\"phase\":\n{}\n", lines[0], lines[1])).unwrap();
    let e = metrics::read(&path).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    // a complete last line that is wrong (not torn) is still an error
    std::fs::write(&path, format!("{good}{{\"phase\":\"rl\"}}\n")).unwrap();
    assert!(metrics::read(&path).unwrap_err().to_string().contains("line 3"));
}

#[test]
fn a_torn_metrics_line_does_not_block_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = short(&out, 2);
    run(&cfg, &out, true, &RunOptions::default()).unwrap();
    let m = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, format!("{text}{{\"phase\":\"rl\",\"step\":3,\"rep")).unwrap();
    let s = run(&short(&out, 3), &out, true, &RunOptions { resume: Some(out.join("checkpoints/step-2")), ..RunOptions::default() }).unwrap();
    assert_eq!(s.records.iter().filter(|r| r.phase == "rl").map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3]);
}

/// `trainer.lr = 1e30`: the first update blows the weights up, the later ones are non-finite
/// and skipped; the run stops with NonFinite, its metrics hold no null, and the checkpoint it
/// names (if one was written before the skips) holds run_state.json and loads.
#[test]
fn a_huge_lr_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut cfg = short(&out, 6);
    cfg.trainer.lr = 1e30;
    // a gradient even where every reward is 0 (short warm-up: zero advantages)
    cfg.loss.entropy_coef = 0.01;
    cfg.output.checkpoint_every = 1;
    let err = run(&cfg, &out, true, &RunOptions::default()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    let RlError::NonFinite { count, checkpoint, .. } = err else { panic!("{msg}") };
    assert_eq!(count, 3, "{msg}");
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(!text.contains("null"), "{text}");
    let recs = metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert!(recs.iter().map(|r| r.skipped_nonfinite).sum::<usize>() >= 3);
    if let Some(ck) = checkpoint {
        assert!(ck.join("run_state.json").exists());
        lockstep_trainer::trainer::Trainer::resume(&ck, Default::default(), &Device::Cpu).unwrap();
    }
}
