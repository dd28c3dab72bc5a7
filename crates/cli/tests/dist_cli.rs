//! `lockstep dist-check` with thread ranks on the CPU, and the multi-rank edges of the CLI:
//! what `launch` and the rank environment refuse, with messages naming the cause.

use std::process::Command;

fn lockstep() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    // lockstep's, torchrun's and SLURM's rank variables (the test may run under a launcher)
    for k in lockstep_dist::rendezvous::VARS {
        c.env_remove(k);
    }
    c
}

fn run(c: &mut Command) -> (bool, String) {
    let out = c.output().expect("lockstep runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn dist_check_two_thread_ranks_pass_on_cpu() {
    let (ok, out) = run(lockstep().args(["dist-check", "--ranks", "2"]));
    assert!(ok, "{out}");
    for routing in ["token", "expert"] {
        for rank in 0..2 {
            let line = out.lines().find(|l| l.starts_with(&format!("{routing} choice rank {rank}/2"))).unwrap_or_else(|| panic!("{out}"));
            assert!(line.ends_with(" ok"), "{line}");
            assert!(line.contains("routes identical") && line.contains("replay bitwise") && line.contains("replicated params identical"), "{line}");
        }
    }
}

#[test]
fn dist_check_rejects_a_batch_that_does_not_split() {
    let (ok, out) = run(lockstep().args(["dist-check", "--ranks", "3", "--routing", "token"]));
    assert!(!ok);
    assert!(out.contains("rows") && out.contains("3 ranks"), "{out}");
}

#[test]
fn single_rank_commands_refuse_to_run_under_launch() {
    let (ok, out) = run(lockstep().args(["demo"]).env("LOCKSTEP_RANK", "0"));
    assert!(!ok);
    assert!(out.contains("demo does not run over several ranks"), "{out}");
    let (ok, out) = run(lockstep().args(["launch", "--gpus", "2", "--", "serve"]));
    assert!(!ok);
    assert!(out.contains("`serve` does not run over several ranks") && out.contains("train, dist-check"), "{out}");
    let (ok, out) = run(lockstep().args(["launch", "--gpus", "0", "--", "dist-check"]));
    assert!(!ok && out.contains("--gpus"), "{out}");
}

/// `train --ranks 2` (thread ranks on the CPU): the run finishes, rank 0 reports it once, and
/// its rollouts are the single-rank run's (the reward and token counts of every step are
/// identical; `crates/rl/tests/ranks.rs` compares the runs in detail).
#[test]
fn train_over_two_thread_ranks_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let go = |ranks: &str, sub: &str| {
        let out = dir.path().join(sub);
        let (ok, text) = run(lockstep().args(["train", "--quiet", "--steps", "2", "--warmup-steps", "4", "--ranks", ranks, "--out"]).arg(&out));
        assert!(ok, "{text}");
        assert_eq!(text.matches("eval accuracy after warm-up").count(), 1, "{text}");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        metrics
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["reward_mean"].as_f64().unwrap(), v["completion_tokens"].as_u64().unwrap(), v["eval_accuracy"].as_f64())
            })
            .collect::<Vec<_>>()
    };
    let one = go("1", "one");
    let two = go("2", "two");
    assert_eq!(one.len(), 3);
    assert_eq!(one, two);
}

#[test]
fn train_over_ranks_refuses_what_it_cannot_split() {
    let (ok, out) = run(lockstep().args(["train", "--ranks", "0"]));
    assert!(!ok && out.contains("--ranks"), "{out}");
    // 8 experts per MoE layer do not split over 3 ranks
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run(lockstep().args(["train", "--quiet", "--steps", "1", "--warmup-steps", "1", "--ranks", "3", "--out"]).arg(dir.path()));
    assert!(!ok && out.contains("3 ranks do not divide"), "{out}");
    let (ok, out) = run(lockstep().args(["train", "--ranks", "2"]).env("LOCKSTEP_RANK", "0").env("LOCKSTEP_WORLD_SIZE", "2").env("LOCKSTEP_NCCL_ID", "00"));
    assert!(!ok && out.contains("LOCKSTEP_NCCL_ID"), "{out}");
}

#[test]
fn a_bad_rank_environment_names_the_variable() {
    let (ok, out) = run(lockstep().args(["dist-check"]).env("LOCKSTEP_RANK", "0").env("LOCKSTEP_WORLD_SIZE", "2").env("LOCKSTEP_NCCL_ID", "xyz"));
    assert!(!ok);
    assert!(out.contains("LOCKSTEP_NCCL_ID: expected 256 hex digits"), "{out}");
}

#[cfg(not(feature = "nccl"))]
#[test]
fn launch_without_nccl_says_how_to_build_it() {
    let (ok, out) = run(lockstep().args(["launch", "--gpus", "2", "--", "dist-check"]));
    assert!(!ok);
    assert!(out.contains("built without NCCL") && out.contains("cuda,nccl"), "{out}");
    let (ok, out) = run(lockstep().args(["bench-ep"]));
    assert!(!ok && out.contains("nccl"), "{out}");
}
