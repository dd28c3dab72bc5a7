//! `lockstep bench-rl` on the CPU: two steps of the synthetic RL workload on tiny models; the
//! JSON has every field, the warm-up step is left out of the means, the sizes are the
//! workload's and the measured values are sane (no timing is asserted).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn bench_rl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).arg("bench-rl").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn num(v: &Value, key: &str) -> f64 {
    v.pointer(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// Run 2 steps: 2 prompts of 8 tokens × 2 samples of 4 generated, micro-batches of ≤ 24
/// tokens, 2 mini-steps; check the JSON.
fn check(extra: &[&str], out: &Path) -> Value {
    let mut args = vec!["--device", "cpu", "--dtype", "f32", "--prompt-len", "8", "--gen-len", "4", "--prompts", "2", "--group", "2", "--micro-batch-tokens", "24", "--mini-steps", "2", "--steps", "2", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, stdout, err) = bench_rl(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("(warm-up, not averaged)") && stdout.contains("MFU") && stdout.contains("989"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    for key in [
        "bench", "model", "workload", "micro_batches", "flops", "warmup_steps_excluded", "averaged_steps", "rollout_tokens_per_s", "trainer_tokens_per_s",
        "train_tflops_per_s", "mfu", "time_split_s", "train_step_s", "optimizer_probe_s", "peak_memory_gb", "peak_memory_source", "steps",
    ] {
        assert!(v.get(key).is_some(), "{key} missing");
    }
    assert_eq!(v["warmup_steps_excluded"], 1);
    assert_eq!(v["averaged_steps"], serde_json::json!([2]));
    assert_eq!(v["flops"]["peak_tflops"], 989.0);
    assert!(v["flops"]["formula"].as_str().unwrap().contains("6 * N_act"));
    assert!(v["peak_memory_source"].as_str().unwrap().contains("VmHWM"));
    // 2 mini-steps of one group (2 sequences of 12 tokens) each, in one micro-batch
    assert_eq!(v["micro_batches"], serde_json::json!([[[12, 12]], [[12, 12]]]));
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["warmup"], true);
    assert_eq!(steps[1]["warmup"], false);
    for s in steps {
        assert_eq!(s["rollout_tokens"], 16);
        assert_eq!(s["trainer_tokens"], 48);
        for k in ["rollout_s", "pi_old_score_s", "train_step_s", "weight_sync_s", "train_flops", "loss", "grad_norm", "peak_memory_gb"] {
            assert!(s[k].as_f64().is_some_and(f64::is_finite), "steps[].{k} = {}", s[k]);
        }
        assert!(num(s, "/train_flops") > 0.0 && num(s, "/peak_memory_gb") > 0.0);
    }
    for k in ["/rollout_tokens_per_s", "/trainer_tokens_per_s", "/train_tflops_per_s", "/peak_memory_gb", "/optimizer_probe_s", "/train_step_s"] {
        let x = num(&v, k);
        assert!(x.is_finite() && x > 0.0, "{k} = {x}");
    }
    let mfu = num(&v, "/mfu");
    assert!(mfu > 0.0 && mfu < 1.0, "mfu {mfu}");
    for k in ["rollout", "pi_old_score", "fwd_bwd", "optimizer", "weight_sync", "step"] {
        let x = num(&v, &format!("/time_split_s/{k}"));
        assert!(x.is_finite() && x >= 0.0, "time_split_s.{k} = {x}");
    }
    let split = &v["time_split_s"];
    let sum: f64 = ["rollout", "pi_old_score", "fwd_bwd", "optimizer", "weight_sync"].iter().map(|k| split[k].as_f64().unwrap()).sum();
    assert!((sum - num(&v, "/time_split_s/step")).abs() < 1e-9);
    assert!((num(&v, "/time_split_s/fwd_bwd") + num(&v, "/time_split_s/optimizer") - num(&v, "/train_step_s")).abs() < 1e-9);
    v
}

#[test]
fn bench_rl_embedded_default_two_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let v = check(&[], &tmp.path().join("r.json"));
    assert_eq!(v["model"]["source"], "embedded default");
    assert_eq!(v["model"]["layers"], 4);
}

#[test]
fn bench_rl_random_config_with_fewer_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = root().join("testdata/fixtures/qwen3_moe_tiny/config.json");
    let v = check(&["--random", cfg.to_str().unwrap(), "--num-layers", "2", "--kernels", "standard"], &tmp.path().join("r.json"));
    assert_eq!(v["model"]["layers"], 2);
    assert_eq!(v["model"]["architecture"], "Qwen3MoeForCausalLM");
}

#[test]
fn bench_rl_bf16_trainer_with_activation_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    // a bf16 trainer, an f32 engine (a cast copy at every weight sync)
    let v = check(&["--trainer-dtype", "bf16", "--activation-checkpointing"], &tmp.path().join("r.json"));
    assert_eq!(v["model"]["activation_checkpointing"], true);
    assert!(v["model"]["trainer_dtype"].as_str().unwrap().starts_with("bf16"));
}

#[test]
fn bench_rl_flags_are_checked() {
    let (ok, _, err) = bench_rl(&["--prompt-len", "16", "--gen-len", "16", "--micro-batch-tokens", "20"]);
    assert!(!ok && err.contains("--micro-batch-tokens 20: a sequence (--prompt-len + --gen-len = 32)"), "{err}");
    let (ok, _, err) = bench_rl(&["--prompts", "2", "--mini-steps", "3"]);
    assert!(!ok && err.contains("--mini-steps 3 > --prompts 2"), "{err}");
    let (ok, _, err) = bench_rl(&["--num-layers", "2"]);
    assert!(!ok && err.contains("--num-layers applies to --random only"), "{err}");
    let (ok, _, err) = bench_rl(&["--kernels", "fast", "--steps", "1", "--prompt-len", "4", "--gen-len", "2"]);
    assert!(!ok && err.contains("--kernels `fast`"), "{err}");
    let (ok, _, err) = bench_rl(&["--trainer-dtype", "f16", "--steps", "1", "--prompt-len", "4", "--gen-len", "2"]);
    assert!(!ok && err.contains("--trainer-dtype `f16`: expected f32 or bf16"), "{err}");
}
