//! `lockstep consistency` on an expert-choice model: one-token pools generate in lockstep
//! (invariant kernels: Δ logprob 0, routes identical); wider pools are refused with the reason.

use std::process::Command;

fn consistency(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).arg("consistency").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn expert_choice_block1_is_in_lockstep() {
    let (ok, out, err) = consistency(&["--routing", "expert-choice", "--pool", "block:1", "--batch", "4", "--max-tokens", "4"]);
    assert!(ok, "{err}");
    assert!(out.contains("ExpertChoice") && out.contains("8 per token"), "{out}");
    let inv = out.lines().find(|l| l.starts_with("invariant")).unwrap();
    let cols: Vec<&str> = inv.split_whitespace().collect();
    assert_eq!(cols[3..7], ["0.000e0", "0.000e0", "100.00%", "0"], "{out}");
}

#[test]
fn expert_choice_wide_pool_is_refused() {
    for pool in ["sequence", "block:4", "batch"] {
        let (ok, _, err) = consistency(&["--routing", "expert-choice", "--pool", pool]);
        assert!(!ok);
        assert!(err.contains("expert_choice_pool") && err.contains("token by token") && err.contains("block:1"), "{pool}: {err}");
    }
}
