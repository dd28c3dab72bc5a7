//! The RL objective's config keys and short runs with them: temperature, decoupled PPO, the KL
//! penalty (resumed against the same reference), router shift, GSPO, PPO epochs, zero-variance
//! filtering, the mismatched rollouts of `--compare-replay`, and the example configs.

use lockstep_rl::{run, RunConfig, RunOptions};

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

fn bad(patch: &str) -> String {
    let (from, to) = patch.split_once('|').unwrap();
    assert!(lockstep_rl::config::DEFAULT_TOML.contains(from), "{from}");
    RunConfig::from_toml(&lockstep_rl::config::DEFAULT_TOML.replace(from, to)).unwrap_err().to_string()
}

#[test]
fn new_keys_are_validated_and_named() {
    let e = bad("enabled = true|enabled = false\n[loss_]");
    assert!(e.contains("loss_"), "{e}");
    // a joint ratio with replay off names both keys
    let text = lockstep_rl::config::DEFAULT_TOML.replace("enabled = true", "enabled = false").replace("ratio = \"token\"", "ratio = \"joint_sum\"");
    let e = RunConfig::from_toml(&text).unwrap_err().to_string();
    assert!(e.contains("loss.ratio") && e.contains("replay.enabled"), "{e}");
    for (patch, key) in [
        ("pi_old = \"infer\"|pi_old = \"cached\"", "loss.pi_old"),
        ("mismatch = \"none\"|mismatch = \"fp8\"", "rollout.mismatch"),
        ("epochs = 1|epochs = 0", "trainer.epochs"),
        ("kl_estimator = \"k3\"|kl_estimator = \"k2\"", "loss.kl_estimator"),
        ("kl_coef = 0.0 |kl_coef = -1.0 ", "loss.kl_coef"),
        ("router_shift_floor = 0.1|router_shift_floor = 2.0", "loss.router_shift_floor"),
        ("objective = \"ppo\" |objective = \"dpo\" ", "loss.objective"),
        ("filter_zero_variance = false|filter_zero_variance = 3", "rollout.filter_zero_variance"),
    ] {
        let e = bad(patch);
        assert!(e.contains(key), "{patch}: {e}");
    }
    // the new keys are optional: a config written before them still parses with the defaults
    let mut old = String::new();
    for l in lockstep_rl::config::DEFAULT_TOML.lines() {
        let k = l.split('=').next().unwrap().trim();
        if !["mismatch", "filter_zero_variance", "epochs", "pi_old", "router_shift_floor", "kl_coef", "kl_estimator", "entropy_coef"].contains(&k) {
            old.push_str(l);
            old.push('\n');
        }
    }
    let c = RunConfig::from_toml(&old).unwrap();
    assert_eq!((c.rollout.mismatch.as_str(), c.trainer.epochs, c.loss.pi_old.as_str(), c.loss.kl_estimator.as_str()), ("none", 1, "infer", "k3"));
}

#[test]
fn example_configs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            RunConfig::from_toml(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
}

/// Temperature 0.5, π_old recomputed, TIS, joint ratio, GSPO, two epochs: still exactly on
/// policy at the first update of every step; the recomputed π_old equals π_infer (lockstep).
#[test]
fn knobs_run_on_policy_at_any_temperature() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (t, patch)) in [(0.5f32, "joint_mean"), (1.3, "router_shift")].into_iter().enumerate() {
        let out = dir.path().join(format!("r{i}"));
        let mut c = short(&out, 2);
        c.rollout.temperature = t;
        c.loss.pi_old = "recompute".into();
        c.loss.is_correction = "tis".into();
        c.loss.ratio = patch.into();
        c.trainer.epochs = 2;
        if i == 1 {
            c.loss.objective = "gspo".into();
            c.loss.clip_low = 3e-4;
            c.loss.clip_high = 4e-4;
        }
        let s = run(&c, &out, true, &RunOptions::default()).unwrap();
        let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
        assert_eq!(rl.len(), 2);
        for r in &rl {
            assert_eq!(r.train_infer_logprob_diff_max, 0.0, "T = {t}");
            assert_eq!((r.train_infer_kl, r.old_infer_kl, r.old_infer_logprob_diff_max), (0.0, 0.0, 0.0), "T = {t}");
            assert_eq!(r.updates, 4, "2 mini-steps x 2 epochs");
        }
    }
}

/// The KL penalty's reference is the model after the warm-up, saved beside the run; a resumed
/// run penalises against it and equals the straight run.
#[test]
fn kl_penalty_resumes_against_the_same_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |out: &std::path::Path, steps| {
        let mut c = short(out, steps);
        c.loss.kl_coef = 0.1;
        c
    };
    let a = dir.path().join("a");
    let straight = run(&cfg(&a, 4), &a, true, &RunOptions::default()).unwrap();
    assert!(a.join("reference/model.safetensors").exists());
    let rl: Vec<_> = straight.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl[0].ref_kl, 0.0, "the first update is at the reference");
    assert!(rl[3].ref_kl > 0.0);
    let b = dir.path().join("b");
    run(&cfg(&b, 2), &b, true, &RunOptions::default()).unwrap();
    let resumed = run(&cfg(&b, 4), &b, true, &RunOptions { resume: Some(b.join("checkpoints/step-2")), ..RunOptions::default() }).unwrap();
    let key = |r: &lockstep_rl::metrics::StepRecord| (r.step, r.loss.to_bits(), r.ref_kl.to_bits());
    let x: Vec<_> = straight.records.iter().filter(|r| r.phase == "rl").map(key).collect();
    let y: Vec<_> = resumed.records.iter().filter(|r| r.phase == "rl").map(key).collect();
    assert_eq!(x, y);
}

/// Zero-variance groups are dropped and counted; mismatched rollouts are off the trainer by
/// more than rounding while lockstep rollouts are not.
#[test]
fn filtering_and_mismatched_rollouts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let mut c = short(&out, 3);
    c.rollout.filter_zero_variance = true;
    let s = run(&c, &out, true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
    assert!(rl.iter().any(|r| r.filtered_groups > 0), "{:?}", rl.iter().map(|r| r.filtered_groups).collect::<Vec<_>>());
    assert!(rl.iter().all(|r| r.filtered_groups <= 4 && (r.filtered_groups < 4 || r.updates == 0)));
    for m in ["bf16", "standard"] {
        let out = dir.path().join(m);
        let mut c = short(&out, 2);
        c.rollout.mismatch = m.into();
        let s = run(&c, &out, false, &RunOptions::default()).unwrap();
        let r = s.records.iter().find(|r| r.phase == "rl").unwrap();
        assert!(r.train_infer_logprob_diff_max > 0.0, "{m}: the engine differs from the trainer");
        if m == "bf16" {
            assert!(r.train_infer_logprob_diff_max > 1e-3, "{m}: {}", r.train_infer_logprob_diff_max);
        }
    }
}

/// `train` on checkpoints that route differently: an expert-choice model (`block:1`: every
/// expert takes every token, route rows of E experts) and a LLaDA2-style one (sigmoid router,
/// expert bias, group-limited top-k, shared expert, a dense first layer) — with replay, exactly
/// on policy at every step's first update.
#[test]
fn train_on_expert_choice_and_llada2_style_checkpoints() {
    use candle_core::{DType, Device};
    use lockstep_model::config::{Pool, RoutingStrategy};
    use lockstep_model::{ModelConfig, MoeCausalLm};
    let dir = tempfile::tempdir().unwrap();
    let ec = dir.path().join("expert-choice");
    MoeCausalLm::embedded_default(3, DType::F32, &Device::Cpu).unwrap().save(&ec).unwrap();
    // expert choice is a config.json setting (`routing_strategy`, README "Architectures and routers")
    let cj = ec.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    v["routing_strategy"] = "expert_choice".into();
    v["capacity_factor"] = 1.0.into();
    v["expert_choice_pool"] = "block:1".into();
    std::fs::write(&cj, v.to_string()).unwrap();
    let ll = dir.path().join("llada2");
    let json = r#"{"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 256,
  "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "num_experts": 16, "num_experts_per_tok": 4,
  "score_function": "sigmoid", "moe_router_enable_expert_bias": true, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "num_shared_experts": 1, "first_k_dense_replace": 1,
  "norm_topk_prob": true, "use_qk_norm": true, "use_qkv_bias": true, "tie_word_embeddings": false,
  "attention_mode": "causal"}"#;
    // (LLaDA2 itself is a diffusion LM, bidirectional by default; token-by-token rollouts need
    // causal attention, which the engine checks)
    let cfg = ModelConfig::from_json_str(json, "llada2 test config").unwrap();
    MoeCausalLm::random(&cfg, 5, DType::F32, &Device::Cpu).unwrap().save(&ll).unwrap();
    for (ckpt, ratio) in [(&ec, "token"), (&ec, "router_shift"), (&ll, "token"), (&ll, "router_shift")] {
        let reloaded = MoeCausalLm::load(ckpt, DType::F32, &Device::Cpu).unwrap();
        if ckpt == &ec {
            assert_eq!(reloaded.cfg.moe.router.strategy, RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Block(1) });
        }
        let out = dir.path().join(format!("run-{}-{ratio}", ckpt.file_name().unwrap().to_string_lossy()));
        let mut c = short(&out, 2);
        c.warmup.steps = 2;
        c.model.checkpoint = Some(ckpt.display().to_string());
        c.loss.ratio = ratio.into();
        let s = run(&c, &out, true, &RunOptions::default()).unwrap();
        for r in s.records.iter().filter(|r| r.phase == "rl") {
            assert_eq!((r.train_infer_logprob_diff_max, r.train_infer_kl), (0.0, 0.0), "{}: {ratio}", ckpt.display());
            assert!(!r.layers.is_empty() && r.layers.values().all(|l| l.route_agreement > 0.0), "{:?}", r.layers);
        }
    }
}
