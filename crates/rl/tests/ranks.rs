//! The RL loop over thread ranks (expert parallelism + data parallelism, `lockstep_dist`):
//! two ranks run the single-rank run (the warm-up bit for bit; then the same rollouts, same
//! routes, losses and gradient norms up to summation order), also at the default config's
//! batch shape and warm-up; a two-rank checkpoint is an ordinary checkpoint — the two-rank run
//! resumes from it bit for bit, and one rank resumes from it too.

use std::path::Path;
use std::sync::Arc;

use lockstep_dist::{run_ranks, RankGroup};
use lockstep_rl::config::RunConfig;
use lockstep_rl::metrics::StepRecord;
use lockstep_rl::{run, RunOptions, RunSummary};

fn short(out: &Path, steps: u64) -> RunConfig {
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

/// Rank 0's summary of the run on `world` thread ranks.
fn run_on(world: usize, cfg: &RunConfig, out: &Path, resume: Option<&Path>) -> RunSummary {
    let mut all = run_ranks(world, |c| {
        let opts = RunOptions { resume: resume.map(Path::to_path_buf), parallel: Some(Arc::new(RankGroup::new(Arc::new(c)))), ..RunOptions::default() };
        run(cfg, out, true, &opts)
    });
    all.swap_remove(0).expect("rank 0 did not panic").expect("rank 0 ran")
}

fn rl(s: &RunSummary) -> Vec<&StepRecord> {
    s.records.iter().filter(|r| r.phase == "rl").collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1e-3), "{what}: {a} vs {b}");
}

#[test]
fn two_ranks_run_the_single_rank_run() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    let one = run(&short(&a, 3), &a, true, &RunOptions::default()).unwrap();
    let two = run_on(2, &short(&b, 3), &b, None);
    assert_eq!(one.warmup_eval, two.warmup_eval);
    let (r1, r2) = (rl(&one), rl(&two));
    assert_eq!(r1.len(), 3);
    assert_eq!(r2.len(), 3);
    for (x, y) in r1.iter().zip(&r2) {
        // the same completions: rewards, token counts, held-out accuracy
        assert_eq!((x.step, x.reward_mean, x.completion_tokens, x.eval_accuracy), (y.step, y.reward_mean, y.completion_tokens, y.eval_accuracy));
        for (v, w, what) in [(x.loss, y.loss, "loss"), (x.kl, y.kl, "kl"), (x.grad_norm, y.grad_norm, "grad_norm"), (x.entropy, y.entropy, "entropy")] {
            close(v, w, &format!("step {} {what}", x.step));
        }
        assert_eq!(x.layers.keys().collect::<Vec<_>>(), y.layers.keys().collect::<Vec<_>>());
        for (l, p) in &x.layers {
            let q = &y.layers[l];
            // loads of identical routes: max_vio and agreement exactly; confidence up to rounding
            assert_eq!((p.max_vio, p.route_agreement), (q.max_vio, q.route_agreement), "step {} layer {l}", x.step);
            close(p.confidence, q.confidence, "confidence");
            // one rank: the same load; two ranks: no rank's own imbalance is below the global
            // one (max Σ_r load ≤ Σ_r max load_r, the mediant of the ranks' ratios)
            assert_eq!(p.max_vio_rank_max, p.max_vio);
            assert!(q.max_vio_rank_max >= q.max_vio, "step {} layer {l}: {q:?}", x.step);
        }
    }
    // only rank 0 wrote the run directory, once
    let lines = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 4);
    assert!(b.join("report.html").exists() && b.join("checkpoints/step-2/model.safetensors").exists());
}

/// The default config (its whole warm-up: 60 steps of 32 instances at lr 3e-3; its batch
/// shape: 16 prompts × 8 samples, 2 mini-steps, token budget 1024) for 3 RL steps.
fn default_shape(out: &Path) -> RunConfig {
    let mut c = RunConfig::default_config();
    c.steps = 3;
    c.eval.every = 3;
    c.output.dir = out.display().to_string();
    c.output.checkpoint_every = 0;
    c
}

#[test]
fn two_ranks_run_the_default_config_as_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let d = RunConfig::default_config();
    assert_eq!((d.warmup.steps, d.warmup.batch, d.rollout.prompts_per_step, d.rollout.group_size, d.trainer.mini_steps, d.trainer.token_budget), (60, 32, 16, 8, 2, 1024));

    // the warm-up: the same weights bit for bit (a frozen KL reference is the model after the
    // warm-up, saved with the experts gathered). Split over the ranks, its gradients summed
    // in another order, it had parted by ~4e-3 after 60 steps — as one rank does when it
    // splits the batch into two micro-batches — and RL step 1 sampled other completions.
    let warm = |world: usize, sub: &str| {
        let out = dir.path().join(sub);
        let mut c = default_shape(&out);
        (c.steps, c.loss.kl_coef) = (0, 1e-9);
        if world == 1 {
            run(&c, &out, true, &RunOptions::default()).unwrap();
        } else {
            run_on(world, &c, &out, None);
        }
        std::fs::read(out.join("reference/model.safetensors")).unwrap()
    };
    assert!(warm(1, "warm-one") == warm(2, "warm-two"), "the 2-rank warm-up parted from the single-rank one");

    // the RL steps: the same completions; losses and norms up to the summation of the ranks'
    // gradients
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    let one = run(&default_shape(&a), &a, true, &RunOptions::default()).unwrap();
    let two = run_on(2, &default_shape(&b), &b, None);
    assert_eq!(one.warmup_eval, two.warmup_eval);
    let (r1, r2) = (rl(&one), rl(&two));
    assert_eq!((r1.len(), r2.len()), (3, 3));
    for (x, y) in r1.iter().zip(&r2) {
        assert_eq!((x.step, x.reward_mean, x.completion_tokens, x.eval_accuracy, x.updates), (y.step, y.reward_mean, y.completion_tokens, y.eval_accuracy, y.updates));
        assert_eq!(x.updates, 2, "step {}: one update per mini-step", x.step);
        for (v, w, what) in [(x.loss, y.loss, "loss"), (x.kl, y.kl, "kl"), (x.grad_norm, y.grad_norm, "grad_norm"), (x.entropy, y.entropy, "entropy"), (x.clip_fraction, y.clip_fraction, "clip_fraction")] {
            close(v, w, &format!("step {} {what}", x.step));
        }
        for (l, p) in &x.layers {
            assert_eq!((p.max_vio, p.route_agreement), (y.layers[l].max_vio, y.layers[l].route_agreement), "step {} layer {l}", x.step);
        }
    }
    assert!(r1[2].eval_accuracy.is_some());
}

#[test]
fn a_two_rank_checkpoint_resumes_on_two_ranks_bit_for_bit_and_on_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("straight");
    let straight = run_on(2, &short(&a, 4), &a, None);

    // the same run stopped after step 2, resumed over 2 ranks: identical metrics and weights
    let b = dir.path().join("resumed");
    run_on(2, &short(&b, 2), &b, None);
    let resumed = run_on(2, &short(&b, 4), &b, Some(&b.join("checkpoints/step-2")));
    let key = |r: &&StepRecord| (r.step, r.reward_mean.to_bits(), r.loss.to_bits(), r.kl.to_bits(), r.grad_norm.to_bits(), r.eval_accuracy.map(f64::to_bits));
    assert_eq!(rl(&straight).iter().map(key).collect::<Vec<_>>(), rl(&resumed).iter().map(key).collect::<Vec<_>>());
    let weights = |d: &Path| std::fs::read(d.join("checkpoints/step-4/model.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b));
    let opt = |d: &Path| std::fs::read(d.join("checkpoints/step-4/optimizer.safetensors")).unwrap();
    assert_eq!(opt(&a), opt(&b));

    // one rank resumes the two-rank checkpoint: step 3 samples the same completions
    let c = dir.path().join("one");
    std::fs::create_dir_all(&c).unwrap();
    let one = run(&short(&c, 3), &c, true, &RunOptions { resume: Some(a.join("checkpoints/step-2")), ..RunOptions::default() }).unwrap();
    let (x, y) = (rl(&straight)[2], rl(&one).last().copied().unwrap());
    assert_eq!((x.step, x.reward_mean, x.completion_tokens), (y.step, y.reward_mean, y.completion_tokens));
    close(x.loss, y.loss, "step 3 loss");
}

#[test]
fn a_failing_rank_stops_the_others_with_its_name() {
    // rank 0 cannot write its metrics (a directory stands where the file goes): it fails after
    // the warm-up, and rank 1 stops at its next collective with rank 0 named
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(out.join("metrics.jsonl")).unwrap();
    let cfg = short(&out, 2);
    let all = run_ranks(2, |c| {
        let opts = RunOptions { parallel: Some(Arc::new(RankGroup::new(Arc::new(c)))), ..RunOptions::default() };
        run(&cfg, &out, true, &opts)
    });
    let errs: Vec<String> = all.into_iter().map(|r| r.expect("no panic").map(|_| ()).unwrap_err().to_string()).collect();
    assert!(errs[0].contains("metrics.jsonl"), "{errs:?}");
    assert!(errs[1].contains("rank 0 failed"), "{errs:?}");
}
