//! `lockstep dist-check` with thread ranks on the CPU, and the multi-rank edges of the CLI:
//! what `launch` and the rank environment refuse, with messages naming the cause.

use std::process::Command;

fn lockstep() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    for k in ["LOCKSTEP_RANK", "LOCKSTEP_WORLD_SIZE", "LOCKSTEP_LOCAL_RANK", "LOCKSTEP_NCCL_ID"] {
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
    let (ok, out) = run(lockstep().args(["launch", "--gpus", "2", "--", "train"]));
    assert!(!ok);
    assert!(out.contains("`train` does not run over several ranks") && out.contains("dist-check"), "{out}");
    let (ok, out) = run(lockstep().args(["launch", "--gpus", "0", "--", "dist-check"]));
    assert!(!ok && out.contains("--gpus"), "{out}");
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
