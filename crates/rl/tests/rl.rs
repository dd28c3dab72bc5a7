//! The RL loop: config validation names keys; GRPO advantages by hand; a shortened default run
//! end to end (metrics, report, checkpoint; on-policy first update); resume equals an
//! uninterrupted run.

use lockstep_rl::config::RunConfig;
use lockstep_rl::env::{decode, encode, Addition, Environment};
use lockstep_rl::rollout::grpo_advantages;
use lockstep_rl::{run, RunOptions};

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
        RunConfig::from_toml(&text).unwrap_err().to_string()
    };
    assert!(bad("group_size = 8|group_size = 1").contains("rollout.group_size"));
    assert!(bad("ratio = \"token\"|ratio = \"sideways\"").contains("loss.ratio"));
    assert!(bad("mini_steps = 2|mini_steps = 0").contains("trainer.mini_steps"));
    assert!(bad("kind = \"addition\"|kind = \"chess\"").contains("task.kind"));
    let e = bad("[eval]|[eval]\nbogus = 1");
    assert!(e.contains("bogus"), "{e}");
    let e = bad("lr = 5e-4|lr = \"fast\"");
    assert!(e.contains("lr") || e.contains("invalid type"), "{e}");
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
    let t = env.sample(&mut rng);
    let text = decode(&t.prompt);
    let (a, b) = text.trim_end_matches('=').split_once('+').unwrap();
    let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
    assert_eq!(env.reward(&t, &encode(&format!("{sum}\n"))), 1.0);
    assert_eq!(env.reward(&t, &encode(&format!("{}\n", sum + 1))), 0.0);
    assert!(env.eval_set().iter().all(|e| !(0..200).any(|_| env.sample(&mut rng) == *e)), "held-out instances are never sampled");
}

#[test]
fn short_run_end_to_end_and_resume_matches() {
    let dir = tempfile::tempdir().unwrap();
    let straight = run(&short(&dir.path().join("a"), 4), &dir.path().join("a"), true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = straight.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 4);
    assert!(rl.iter().all(|r| r.layers.len() == 3 && r.completion_tokens > 0));
    assert!(rl[1].eval_accuracy.is_some());
    assert!(dir.path().join("a/report.html").exists());
    assert!(dir.path().join("a/checkpoints/step-2/model.safetensors").exists());

    // stop after 2 steps, resume from the checkpoint: the same 4 steps, bit for bit
    let b = dir.path().join("b");
    run(&short(&b, 2), &b, true, &RunOptions::default()).unwrap();
    let resumed = run(&short(&b, 4), &b, true, &RunOptions { resume: Some(b.join("checkpoints/step-2")), progress: false }).unwrap();
    let key = |r: &lockstep_rl::metrics::StepRecord| (r.step, r.reward_mean.to_bits(), r.loss.to_bits(), r.kl.to_bits());
    let a: Vec<_> = straight.records.iter().filter(|r| r.phase == "rl").map(key).collect();
    let c: Vec<_> = resumed.records.iter().filter(|r| r.phase == "rl").map(key).collect();
    assert_eq!(a, c);
}
