//! The RL loop: config validation names keys; GRPO advantages by hand; a shortened default run
//! end to end (metrics, report, checkpoint; on-policy first update); resume equals an
//! uninterrupted run, also after a stop flag (Ctrl-C) ended it mid-RL or mid-warm-up.

use lockstep_rl::config::RunConfig;
use lockstep_rl::env::{decode, encode, Addition, Environment};
use lockstep_rl::rollout::grpo_advantages;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lockstep_rl::{run, RlError, RunOptions};

fn short(out: &std::path::Path, steps: u64) -> RunConfig {
    let mut c = RunConfig::default_config();
    c.steps = steps;
    c.warmup.steps = 10;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.eval.every = 2;
    c.output.dir = out.display().to_string();
    c.output.checkpoint_every = 2;
    c
}

#[test]
fn config_errors_name_the_key() {
    let bad = |patch: &str| {
        let text = lockstep_rl::config::DEFAULT_TOML.replace(patch.split('|').next().unwrap(), patch.split('|').nth(1).unwrap());
        let e = RunConfig::from_toml(&text).unwrap_err().to_string();
        eprintln!("{e}");
        e
    };
    assert!(bad("group_size = 8|group_size = 1").contains("rollout.group_size"));
    assert!(bad("ratio = \"token\"|ratio = \"sideways\"").contains("loss.ratio"));
    assert!(bad("mini_steps = 2|mini_steps = 0").contains("trainer.mini_steps"));
    assert!(bad("kind = \"addition\"|kind = \"chess\"").contains("task.kind"));
    let e = bad("[eval]|[eval]\nbogus = 1");
    assert!(e.contains("bogus"), "{e}");
    let e = bad("lr = 5e-4|lr = \"fast\"");
    assert!(e.contains("`trainer.lr`") && e.contains("invalid type"), "{e}");
    // unknown keys: top level, a whole section, a key of a section
    let e = bad("seed = 0\n# RL|seed = 0\nsteeps = 3\n# RL");
    assert!(e.contains("steeps"), "{e}");
    let e = bad("[eval]|[evaluation]");
    assert!(e.contains("evaluation"), "{e}");
    let e = bad("temperature = 1.0|temprature = 1.0");
    assert!(e.contains("rollout.temprature"), "{e}");
    // a missing key takes its default (tests/config.rs checks every default)
    assert_eq!(RunConfig::from_toml(&lockstep_rl::config::DEFAULT_TOML.replace("mini_steps = 2\n", "")).unwrap(), RunConfig::default_config());
    // bad values
    assert!(bad("temperature = 1.0|temperature = 0.0").contains("rollout.temperature"));
    assert!(bad("lr = 5e-4|lr = -1.0").contains("trainer.lr"));
    assert!(bad("servers = []|servers = [\"127.0.0.1:8000\"]").contains("rollout.servers"));
    assert!(bad("digits = 1|digits = 9").contains("task.digits"));
    assert!(bad("every = 5|every = 0").contains("eval.every"));
    assert!(bad("is_correction = \"none\"|is_correction = \"maybe\"").contains("loss.is_correction"));
    assert!(bad("kernels = \"invariant\"|kernels = \"fast\"").contains("model.kernels"));
    let e = bad("steps = 100|steps = -3");
    assert!(e.contains("`steps`"), "{e}");
    // the printed config parses back to the same config
    let c = RunConfig::default_config();
    assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
}

#[test]
fn grpo_advantages_by_hand() {
    let a = grpo_advantages(&[1.0, 0.0, 0.0, 1.0]);
    // mean 0.5, std 0.5 → ±1 (up to the 1e-6 in the denominator)
    for (x, y) in a.iter().zip([1.0, -1.0, -1.0, 1.0]) {
        assert!((x - y).abs() < 1e-5, "{a:?}");
    }
    assert_eq!(grpo_advantages(&[1.0, 1.0, 1.0]), vec![0.0, 0.0, 0.0]);
}

#[test]
fn addition_task_rewards_exact_answers() {
    let env = Addition { digits: 1 };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let t = env.sample(0, &mut rng);
    let text = decode(&t.prompt);
    let (a, b) = text.trim_end_matches('=').split_once('+').unwrap();
    let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
    assert_eq!(env.reward(&t, &encode(&format!("{sum}\n"))), 1.0);
    assert_eq!(env.reward(&t, &encode(&format!("{}\n", sum + 1))), 0.0);
    assert!(env.eval_set().iter().all(|e| !(0..200).any(|i| env.sample(i, &mut rng) == *e)), "held-out instances are never sampled");
    // the trait's judge agrees, and every completion token counts
    let c = encode(&format!("{sum}\n"));
    let j = env.judge(&[(&t, c.as_slice())]).unwrap();
    assert_eq!((j[0].scored.reward, j[0].keep), (1.0, c.len()));
}

#[test]
fn short_run_end_to_end_and_resume_matches() {
    let dir = tempfile::tempdir().unwrap();
    let straight = run(&short(&dir.path().join("a"), 4), &dir.path().join("a"), true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = straight.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 4);
    assert!(rl.iter().all(|r| r.layers.len() == 3 && r.completion_tokens > 0));
    // every step records its measured peak (the process's peak resident set on the CPU)
    if std::path::Path::new("/proc/self/status").exists() {
        assert!(rl.iter().all(|r| r.peak_memory_gb.is_some_and(|g| g > 0.0)), "{:?}", rl.iter().map(|r| r.peak_memory_gb).collect::<Vec<_>>());
    }
    // exactly on-policy: every step's first update sees the engine's log-probabilities
    assert!(rl.iter().all(|r| r.train_infer_logprob_diff_max == 0.0 && r.train_infer_kl == 0.0), "{rl:?}");
    assert!(rl.iter().any(|r| r.kl > 0.0), "the later, off-policy updates do move");
    assert!(rl[1].eval_accuracy.is_some());
    assert!(dir.path().join("a/report.html").exists());
    assert!(dir.path().join("a/checkpoints/step-2/model.safetensors").exists());

    // stop after 2 steps, resume from the checkpoint: the same 4 steps, bit for bit
    let b = dir.path().join("b");
    run(&short(&b, 2), &b, true, &RunOptions::default()).unwrap();
    let resumed = run(&short(&b, 4), &b, true, &RunOptions { resume: Some(b.join("checkpoints/step-2")), ..RunOptions::default() }).unwrap();
    let key = |r: &lockstep_rl::metrics::StepRecord| (r.step, r.reward_mean.to_bits(), r.loss.to_bits(), r.kl.to_bits());
    let a: Vec<_> = straight.records.iter().filter(|r| r.phase == "rl").map(key).collect();
    let c: Vec<_> = resumed.records.iter().filter(|r| r.phase == "rl").map(key).collect();
    assert_eq!(a, c);
}

fn rl_key(s: &lockstep_rl::RunSummary) -> Vec<(u64, u64, u64, u64, Option<u64>)> {
    s.records.iter().filter(|r| r.phase == "rl").map(|r| (r.step, r.reward_mean.to_bits(), r.loss.to_bits(), r.kl.to_bits(), r.eval_accuracy.map(f64::to_bits))).collect()
}

fn model_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

/// A stop flag set by another thread once step 1's metrics are written: the run ends after the
/// step in progress with a checkpoint; resuming it gives the uninterrupted run bit for bit
/// (metrics and final weights). Same for a flag set before the start (stops after warm-up step 1).
#[test]
fn stop_flag_leaves_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let straight_dir = dir.path().join("straight");
    let straight = run(&short(&straight_dir, 4), &straight_dir, true, &RunOptions::default()).unwrap();

    // --- interrupted during the RL steps
    let b = dir.path().join("b");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, metrics) = (stop.clone(), b.join("metrics.jsonl"));
        std::thread::spawn(move || loop {
            let text = std::fs::read_to_string(&metrics).unwrap_or_default();
            if text.contains("\"phase\":\"rl\"") {
                stop.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        })
    };
    let opts = RunOptions { stop: Some(stop), ..RunOptions::default() };
    let err = run(&short(&b, 4), &b, true, &opts).unwrap_err();
    watcher.join().unwrap();
    let RlError::Interrupted { checkpoint, after } = err else { panic!("{err}") };
    let step: u64 = checkpoint.file_name().unwrap().to_str().unwrap().strip_prefix("step-").unwrap().parse().unwrap();
    assert!((1..4).contains(&step), "{after}: {}", checkpoint.display());
    assert!(checkpoint.join("run_state.json").exists() && checkpoint.join("optimizer.safetensors").exists());
    let resumed = run(&short(&b, 4), &b, true, &RunOptions { resume: Some(checkpoint), ..RunOptions::default() }).unwrap();
    assert_eq!(rl_key(&straight), rl_key(&resumed));
    assert_eq!(model_bytes(&straight_dir.join("checkpoints/step-4")), model_bytes(&b.join("checkpoints/step-4")));

    // --- interrupted during the warm-up (flag set from the start: stops after warm-up step 1)
    let c = dir.path().join("c");
    let opts = RunOptions { stop: Some(Arc::new(AtomicBool::new(true))), ..RunOptions::default() };
    let RlError::Interrupted { checkpoint, after } = run(&short(&c, 4), &c, true, &opts).unwrap_err() else { panic!() };
    assert!(after.contains("warm-up step 1/10"), "{after}");
    assert_eq!(checkpoint, c.join("checkpoints/warmup-1"));
    let resumed = run(&short(&c, 4), &c, true, &RunOptions { resume: Some(checkpoint), ..RunOptions::default() }).unwrap();
    assert_eq!(straight.warmup_eval.to_bits(), resumed.warmup_eval.to_bits());
    assert_eq!(rl_key(&straight), rl_key(&resumed));
    assert_eq!(model_bytes(&straight_dir.join("checkpoints/step-4")), model_bytes(&c.join("checkpoints/step-4")));
}
