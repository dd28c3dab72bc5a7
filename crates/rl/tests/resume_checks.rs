//! Resume validation: run_state.json carries the config's fingerprint and a resume under a
//! config that changes the trajectory is refused naming the keys (unless
//! `allow_config_change`); the warm-up writes periodic checkpoints that resume mid-warm-up bit
//! for bit; leftovers of interrupted saves are cleaned (a displaced checkpoint restored) when a
//! run starts.

use std::path::Path;

use lockstep_rl::config::RunConfig;
use lockstep_rl::{run, RunOptions};

fn short(out: &Path, steps: u64) -> RunConfig {
    let mut c = RunConfig::default_config();
    c.steps = steps;
    c.warmup.steps = 5;
    c.warmup.batch = 8;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.eval.every = 2;
    c.output.dir = out.display().to_string();
    c.output.checkpoint_every = 2;
    c
}

fn resume(cfg: &RunConfig, out: &Path, from: &Path) -> lockstep_rl::Result<lockstep_rl::RunSummary> {
    run(cfg, out, true, &RunOptions { resume: Some(from.to_path_buf()), ..RunOptions::default() })
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn a_resume_under_a_changed_config_is_refused_naming_the_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    run(&short(&a, 2), &a, true, &RunOptions::default()).unwrap();
    let ck = a.join("checkpoints/step-2");
    let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.join("run_state.json")).unwrap()).unwrap();
    assert_eq!(st["config_fingerprint"].as_str().map(str::len), Some(64), "{st}");
    assert_eq!(st["config"]["loss.clip_low"], "0.2");
    assert!(st["config"].get("steps").is_none() && st["config"].get("output.dir").is_none() && st["config"].get("eval.every").is_none());

    // loss.clip_low and seed changed: refused, both named, nothing run
    let b = tmp.path().join("b");
    let mut changed = short(&b, 4);
    changed.loss.clip_low = 0.1;
    changed.seed = 7;
    let e = resume(&changed, &b, &ck).unwrap_err().to_string();
    assert!(e.contains("run_state.json") && e.contains("`loss.clip_low`: 0.2 in the checkpoint, 0.1 now") && e.contains("`seed`"), "{e}");
    assert!(e.contains("allow_config_change"), "the override is named: {e}");
    assert!(!b.join("checkpoints/step-3").exists());
    // the effective replay counts: the checkpoint was written with replay on
    let e = run(&short(&b, 4), &b, false, &RunOptions { resume: Some(ck.clone()), ..RunOptions::default() }).unwrap_err().to_string();
    assert!(e.contains("`replay.enabled`"), "{e}");

    // the override continues under the new config
    changed.allow_config_change = true;
    let s = resume(&changed, &b, &ck).unwrap();
    assert_eq!(s.records.iter().filter(|r| r.phase == "rl").map(|r| r.step).max(), Some(4));
    // steps, eval and output keys do not count
    let c = tmp.path().join("c");
    let mut more = short(&c, 4);
    more.eval.every = 3;
    more.output.checkpoint_every = 4;
    resume(&more, &c, &ck).unwrap();
    assert!(c.join("checkpoints/step-4").exists());
    // a run_state.json from before fingerprints resumes unchecked
    let d = tmp.path().join("d-ck");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&ck).unwrap().flatten() {
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("run_state.json")).unwrap()).unwrap();
    old.as_object_mut().unwrap().retain(|k, _| !k.starts_with("config"));
    std::fs::write(d.join("run_state.json"), old.to_string()).unwrap();
    let mut changed = short(&tmp.path().join("d"), 3);
    changed.loss.clip_low = 0.1;
    resume(&changed, &tmp.path().join("d"), &d).unwrap();
}

#[test]
fn the_warm_up_checkpoints_periodically_and_resumes_mid_warm_up_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    run(&short(&a, 2), &a, true, &RunOptions::default()).unwrap();
    // warm-up of 5 steps, every 2: warmup-2, warmup-4 (the last warm-up step is followed by
    // the RL steps' checkpoints)
    let cks = a.join("checkpoints");
    for n in [2, 4] {
        let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cks.join(format!("warmup-{n}/run_state.json"))).unwrap()).unwrap();
        assert_eq!(st["warmup_step"], n, "{st}");
        assert_eq!(st["rl_step"], 0);
    }
    assert!(!cks.join("warmup-5").exists() && cks.join("step-2").exists());

    // resumed from warmup-4 elsewhere: the same run, bit for bit
    let b = tmp.path().join("b");
    let s = resume(&short(&b, 2), &b, &cks.join("warmup-4")).unwrap();
    assert_eq!(bytes(&cks.join("step-2/model.safetensors")), bytes(&b.join("checkpoints/step-2/model.safetensors")));
    assert_eq!(bytes(&cks.join("step-2/optimizer.safetensors")), bytes(&b.join("checkpoints/step-2/optimizer.safetensors")));
    assert!(s.records.iter().any(|r| r.phase == "warmup"));
}

#[test]
fn leftovers_of_interrupted_saves_are_cleaned_when_a_run_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    run(&short(&a, 2), &a, true, &RunOptions::default()).unwrap();
    let cks = a.join("checkpoints");
    // killed between the two renames of a re-save of step-2 (the old one aside), and a
    // temporary directory of another save
    std::fs::rename(cks.join("step-2"), cks.join(".step-2.old-4242")).unwrap();
    std::fs::create_dir_all(cks.join(".step-9.tmp-77")).unwrap();
    std::fs::write(cks.join(".step-9.tmp-77/model.safetensors"), b"torn").unwrap();
    std::fs::create_dir_all(cks.join(".keep-me")).unwrap();
    let s = resume(&short(&a, 4), &a, &cks.join("step-2")).unwrap();
    assert_eq!(s.records.iter().filter(|r| r.phase == "rl").count(), 4);
    let mut left: Vec<String> = std::fs::read_dir(&cks).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.starts_with('.')).collect();
    left.sort();
    assert_eq!(left, vec![".keep-me".to_string()], "only what is not a save's leftover stays");
    assert!(cks.join("step-2/run_state.json").exists() && cks.join("step-4/lockstep-manifest.json").exists());
}
