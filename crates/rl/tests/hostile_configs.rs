//! Hostile TOML run configs, counted: every bad config must be refused by
//! `RunConfig::from_toml` with an error naming the key at fault, and none may panic. Prints
//! `hostile_configs: tried N, refused R (field named F), panics P, accepted-wrongly A` and the
//! known gaps (configs accepted today that should not be), which are reported, not asserted.

use std::panic::{catch_unwind, AssertUnwindSafe};

use lockstep_rl::config::RunConfig;
use lockstep_rl::RlError;

const DS: &str = "[task]\nkind = \"dataset\"\npath = \"train.jsonl\"\n";

fn sec(section: &str, body: &str) -> String {
    format!("[{section}]\n{body}\n")
}

fn reward(body: &str) -> String {
    format!("{DS}[[reward]]\n{body}\n")
}

/// (what, config text, the key the error must name)
fn bad_configs() -> Vec<(String, String, &'static str)> {
    let mut v: Vec<(String, String, &'static str)> = Vec::new();
    let mut add = |what: &str, text: String, key: &'static str| v.push((what.to_string(), text, key));
    // syntax and structure
    add("unclosed table header", "[trainer\nlr = 1.0\n".into(), "");
    add("missing value", "[trainer]\nlr =\n".into(), "");
    add("missing key", "= 1\n".into(), "");
    add("duplicate key", "seed = 1\nseed = 2\n".into(), "seed");
    add("duplicate table", "[trainer]\nlr = 1e-3\n[trainer]\nlr = 2e-3\n".into(), "trainer");
    add("integer beyond i64", "steps = 99999999999999999999\n".into(), "steps");
    add("section as a number", "trainer = 5\n".into(), "trainer");
    add("unknown top-level key", "stepz = 3\n".into(), "stepz");
    add("unknown section", "[bogus]\nx = 1\n".into(), "bogus");
    add("unknown trainer key", sec("trainer", "learning_rate = 1e-3"), "learning_rate");
    add("unknown loss key", sec("loss", "clip = 0.2"), "clip");
    add("unknown reward key", reward("kind = \"math\"\ntolerence = 0.1"), "tolerence");
    // wrong types
    add("steps negative", "steps = -1\n".into(), "steps");
    add("seed a string", "seed = \"zero\"\n".into(), "seed");
    add("trainer.lr a string", sec("trainer", "lr = \"fast\""), "trainer.lr");
    add("rollout.max_tokens negative", sec("rollout", "max_tokens = -1"), "rollout.max_tokens");
    add("rollout.max_tokens a float", sec("rollout", "max_tokens = 4.5"), "rollout.max_tokens");
    add("rollout.servers a string", sec("rollout", "servers = \"http://127.0.0.1:8000\""), "rollout.servers");
    add("replay.enabled a string", sec("replay", "enabled = \"yes\""), "replay.enabled");
    add("task.stop a string", format!("{DS}stop = \"\\n\"\n"), "task.stop");
    add("eval.pass_k negative", sec("eval", "pass_k = [-1]"), "eval.pass_k");
    add("reward weight a string", reward("kind = \"exact\"\nweight = \"heavy\""), "weight");
    // learning rates and numbers out of range
    add("trainer.lr = nan", sec("trainer", "lr = nan"), "trainer.lr");
    add("trainer.lr = -1", sec("trainer", "lr = -1.0"), "trainer.lr");
    add("trainer.lr = 0", sec("trainer", "lr = 0.0"), "trainer.lr");
    add("trainer.lr = -inf", sec("trainer", "lr = -inf"), "trainer.lr");
    add("warmup.lr = nan", sec("warmup", "lr = nan"), "warmup.lr");
    add("warmup.lr = -3e-3", sec("warmup", "lr = -3e-3"), "warmup.lr");
    add("warmup.batch = 0", sec("warmup", "batch = 0"), "warmup.batch");
    add("rollout.max_tokens = 0", sec("rollout", "max_tokens = 0"), "rollout.max_tokens");
    add("rollout.temperature = 0", sec("rollout", "temperature = 0.0"), "rollout.temperature");
    add("rollout.temperature = -1", sec("rollout", "temperature = -1.0"), "rollout.temperature");
    add("rollout.temperature = nan", sec("rollout", "temperature = nan"), "rollout.temperature");
    add("rollout.temperature = inf", sec("rollout", "temperature = inf"), "rollout.temperature");
    add("rollout.temperature = 1e300 (f32 overflow)", sec("rollout", "temperature = 1e300"), "rollout.temperature");
    add("rollout.group_size = 1", sec("rollout", "group_size = 1"), "rollout.group_size");
    add("rollout.group_size = 0", sec("rollout", "group_size = 0"), "rollout.group_size");
    add("rollout.prompts_per_step = 0", sec("rollout", "prompts_per_step = 0"), "rollout.prompts_per_step");
    add("rollout.mismatch = fp8", sec("rollout", "mismatch = \"fp8\""), "rollout.mismatch");
    add("mismatch with servers", sec("rollout", "mismatch = \"bf16\"\nservers = [\"http://127.0.0.1:1\"]"), "rollout.mismatch");
    add("server not a URL", sec("rollout", "servers = [\"ftp://host\"]"), "rollout.servers[0]");
    add("server kind unknown", sec("rollout", "servers = [\"tgi+http://host\"]"), "rollout.servers[0].kind");
    add("server kinds mixed", sec("rollout", "servers = [\"http://a\", \"vllm+http://b\"]"), "rollout.servers[1].kind");
    add("server table unknown key", sec("rollout", "servers = [{ url = \"http://a\", port = 1 }]"), "rollout.servers");
    add("trainer.mini_steps = 0", sec("trainer", "mini_steps = 0"), "trainer.mini_steps");
    add("trainer.mini_steps > prompts", sec("trainer", "mini_steps = 40"), "trainer.mini_steps");
    add("trainer.token_budget = 8", sec("trainer", "token_budget = 8"), "trainer.token_budget");
    add("trainer.max_grad_norm = 0", sec("trainer", "max_grad_norm = 0.0"), "trainer.max_grad_norm");
    add("trainer.max_grad_norm = nan", sec("trainer", "max_grad_norm = nan"), "trainer.max_grad_norm");
    add("trainer.epochs = 0", sec("trainer", "epochs = 0"), "trainer.epochs");
    add("trainer.max_nonfinite_steps = 0", sec("trainer", "max_nonfinite_steps = 0"), "trainer.max_nonfinite_steps");
    add("trainer.max_nonfinite_steps = 10^9", sec("trainer", "max_nonfinite_steps = 1000000000"), "trainer.max_nonfinite_steps");
    // model, task
    add("model.kernels = fast", sec("model", "kernels = \"fast\""), "model.kernels");
    add("task.kind = chess", sec("task", "kind = \"chess\""), "task.kind");
    add("task.digits = 0", sec("task", "digits = 0"), "task.digits");
    add("task.digits = 5", sec("task", "digits = 5"), "task.digits");
    add("task.digits = 10^9", sec("task", "digits = 1000000000"), "task.digits");
    add("dataset without path", sec("task", "kind = \"dataset\""), "task.path");
    add("dataset with an empty path", sec("task", "kind = \"dataset\"\npath = \"\""), "task.path");
    add("test_fraction = 1.5", format!("{DS}test_fraction = 1.5\n"), "task.test_fraction");
    add("test_fraction = 0", format!("{DS}test_fraction = 0.0\n"), "task.test_fraction");
    add("test_fraction = nan", format!("{DS}test_fraction = nan\n"), "task.test_fraction");
    add("empty prompt_field", format!("{DS}prompt_field = \"\"\n"), "task.prompt_field");
    add("empty answer_field", format!("{DS}answer_field = \"\"\n"), "task.answer_field");
    add("max_eval = 0", format!("{DS}max_eval = 0\n"), "task.max_eval");
    add("empty stop string", format!("{DS}stop = [\"\\n\", \"\"]\n"), "task.stop[1]");
    // rewards
    add("reward on the addition task", "[[reward]]\nkind = \"exact\"\n".into(), "reward");
    add("reward kind unknown", reward("kind = \"bleu\""), "reward[0].kind");
    add("reward without kind", reward("weight = 1.0"), "kind");
    add("reward weight = inf", reward("kind = \"exact\"\nweight = inf"), "reward[0].weight");
    add("reward weight = nan", reward("kind = \"exact\"\nweight = nan"), "reward[0].weight");
    add("regex without pattern", reward("kind = \"regex\""), "reward[0].pattern");
    add("regex pattern unclosed", reward("kind = \"regex\"\npattern = \"(unclosed\""), "reward[0].pattern");
    add("format pattern bad", reward("kind = \"format\"\npattern = \"[z-a]\""), "reward[0].pattern");
    add("math tolerance = -1", reward("kind = \"math\"\ntolerance = -1.0"), "reward[0].tolerance");
    add("math tolerance = inf", reward("kind = \"math\"\ntolerance = inf"), "reward[0].tolerance");
    add("length target = 0", reward("kind = \"length\"\ntarget = 0"), "reward[0].target");
    add("length without target", reward("kind = \"length\""), "reward[0].target");
    add("http url ftp", reward("kind = \"http\"\nurl = \"ftp://verifier\""), "reward[0].url");
    add("http without url", reward("kind = \"http\""), "reward[0].url");
    add("http timeout_s = 0", reward("kind = \"http\"\nurl = \"http://v\"\ntimeout_s = 0.0"), "reward[0].timeout_s");
    add("http timeout_s = inf", reward("kind = \"http\"\nurl = \"http://v\"\ntimeout_s = inf"), "reward[0].timeout_s");
    add("http concurrency = 0", reward("kind = \"http\"\nurl = \"http://v\"\nconcurrency = 0"), "reward[0].concurrency");
    add("http max_failures = 0", reward("kind = \"http\"\nurl = \"http://v\"\nmax_failures = 0"), "reward[0].max_failures");
    add("exact with a pattern", reward("kind = \"exact\"\npattern = \"x\""), "reward[0].pattern");
    add("second reward bad", format!("{DS}[[reward]]\nkind = \"exact\"\n[[reward]]\nkind = \"math\"\npattern = \"x\"\n"), "reward[1].pattern");
    // loss
    add("loss.objective = dpo", sec("loss", "objective = \"dpo\""), "loss.objective");
    add("loss.pi_old = old", sec("loss", "pi_old = \"old\""), "loss.pi_old");
    add("loss.kl_estimator = k2", sec("loss", "kl_estimator = \"k2\""), "loss.kl_estimator");
    add("loss.kl_coef = -1", sec("loss", "kl_coef = -1.0"), "loss.kl_coef");
    add("loss.kl_coef = inf", sec("loss", "kl_coef = inf"), "loss.kl_coef");
    add("loss.entropy_coef = nan", sec("loss", "entropy_coef = nan"), "loss.entropy_coef");
    add("loss.router_shift_floor = 2", sec("loss", "router_shift_floor = 2.0"), "loss.router_shift_floor");
    add("loss.is_correction = xis", sec("loss", "is_correction = \"xis\""), "loss.is_correction");
    add("loss.ratio = seq", sec("loss", "ratio = \"seq\""), "loss.ratio");
    add("joint ratio without replay", "[replay]\nenabled = false\n[loss]\nratio = \"joint_sum\"\n".into(), "loss.ratio");
    add("loss.clip_low = 1", sec("loss", "clip_low = 1.0"), "loss.clip_low");
    add("loss.clip_high = 0", sec("loss", "clip_high = 0.0"), "loss.clip_high");
    add("loss.tis_cap = 0", sec("loss", "tis_cap = 0.0"), "loss.tis_cap");
    add("loss.mis_low >= mis_high", sec("loss", "mis_low = 2.0\nmis_high = 1.0"), "loss.mis_low");
    add("loss.extreme_tau = 1", sec("loss", "extreme_tau = 1.0"), "loss.extreme_tau");
    // eval, output
    add("eval.every = 0", sec("eval", "every = 0"), "eval.every");
    add("eval.pass_k = [0]", sec("eval", "pass_k = [0]"), "eval.pass_k");
    add("eval.pass_k beyond group_size", sec("eval", "pass_k = [100]"), "eval.pass_k");
    add("eval.pass_threshold = nan", sec("eval", "pass_threshold = nan"), "eval.pass_threshold");
    add("output.dir empty", sec("output", "dir = \"\""), "output.dir");
    v
}

/// Configs that should be refused but are accepted today (printed, not asserted): what, text,
/// the key that should be named. Checked again on every run, so a fix shows up as "now refused".
fn known_gaps() -> Vec<(&'static str, String, &'static str)> {
    Vec::new()
}

/// Configs accepted when these tests were written and refused by name since (asserted).
fn fixed_gaps() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("trainer.lr = inf", sec("trainer", "lr = inf"), "trainer.lr"),
        ("warmup.lr = inf", sec("warmup", "lr = inf"), "warmup.lr"),
        ("trainer.lr = 1e300", sec("trainer", "lr = 1e300"), "trainer.lr"),
        ("rollout.max_tokens = 10^9", sec("rollout", "max_tokens = 1000000000"), "rollout.max_tokens"),
        ("rollout.temperature = 1e30", sec("rollout", "temperature = 1e30"), "rollout.temperature"),
        ("trainer.weight_decay = -1", sec("trainer", "weight_decay = -1.0"), "trainer.weight_decay"),
        ("trainer.weight_decay = nan", sec("trainer", "weight_decay = nan"), "trainer.weight_decay"),
        ("trainer.max_grad_norm = inf", sec("trainer", "max_grad_norm = inf"), "trainer.max_grad_norm"),
        ("loss.clip_high = inf", sec("loss", "clip_high = inf"), "loss.clip_high"),
        ("loss.extreme_tau = inf", sec("loss", "extreme_tau = inf"), "loss.extreme_tau"),
        ("loss.mis_high = inf", sec("loss", "mis_high = inf"), "loss.mis_high"),
        ("loss.tis_cap = inf", sec("loss", "tis_cap = inf"), "loss.tis_cap"),
        ("loss.entropy_coef = -1e300", sec("loss", "entropy_coef = -1e300"), "loss.entropy_coef"),
        ("model.checkpoint empty", sec("model", "checkpoint = \"\""), "model.checkpoint"),
        ("task.test_path empty", format!("{DS}test_path = \"\"\n"), "task.test_path"),
        ("task.messages_field empty", format!("{DS}prompt_field = \"\"\nmessages_field = \"\"\n"), "task.messages_field"),
        ("rollout.servers duplicate", sec("rollout", "servers = [\"http://a\", \"http://a\"]"), "rollout.servers"),
        ("rollout.servers \"http://\" (no host)", sec("rollout", "servers = [\"http://\"]"), "rollout.servers[0]"),
        ("reward http url \"http://\" (no host)", reward("kind = \"http\"\nurl = \"http://\""), "reward[0].url"),
        ("reward weight = 0 only reward", reward("kind = \"exact\"\nweight = 0.0"), "reward[0].weight"),
        ("reward http retries = 10^9", reward("kind = \"http\"\nurl = \"http://v\"\nretries = 1000000000"), "reward[0].retries"),
        ("reward http concurrency = 10^9", reward("kind = \"http\"\nurl = \"http://v\"\nconcurrency = 1000000000"), "reward[0].concurrency"),
        ("eval.pass_threshold = -1e300", sec("eval", "pass_threshold = -1e300"), "eval.pass_threshold"),
    ]
}

enum Outcome {
    Named,
    Unnamed(String),
    Accepted,
    Panicked,
}

fn try_config(text: &str, key: &str) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| RunConfig::from_toml(text))) {
        Err(_) => Outcome::Panicked,
        Ok(Ok(_)) => Outcome::Accepted,
        Ok(Err(e)) => {
            let shown = e.to_string();
            let named = match &e {
                RlError::Config { key: k, .. } => !k.is_empty() && k != "<toml>" && (key.is_empty() || k.contains(key)),
                _ => false,
            };
            if named || (key.is_empty() && matches!(e, RlError::Config { .. })) {
                Outcome::Named
            } else {
                Outcome::Unnamed(shown)
            }
        }
    }
}

#[test]
fn hostile_run_configs_are_refused_by_name_without_panics() {
    let cases: Vec<_> = bad_configs().into_iter().chain(fixed_gaps().into_iter().map(|(w, t, k)| (w.to_string(), t, k))).collect();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let (mut refused, mut named, mut panics) = (0, 0, 0);
    let mut failures = Vec::new();
    for (what, text, key) in &cases {
        match try_config(text, key) {
            Outcome::Named => {
                refused += 1;
                named += 1;
            }
            Outcome::Unnamed(e) => {
                refused += 1;
                failures.push(format!("{what}: refused without naming `{key}`: {e}"));
            }
            Outcome::Accepted => failures.push(format!("{what}: accepted\n{text}")),
            Outcome::Panicked => {
                panics += 1;
                failures.push(format!("{what}: PANIC\n{text}"));
            }
        }
    }
    let gaps = known_gaps();
    let mut gap_panics = 0;
    let mut still = Vec::new();
    for (what, text, key) in &gaps {
        match try_config(text, key) {
            Outcome::Accepted => still.push(*what),
            Outcome::Panicked => {
                gap_panics += 1;
                failures.push(format!("{what}: PANIC\n{text}"));
            }
            _ => eprintln!("hostile_configs: known gap now refused: {what}"),
        }
    }
    eprintln!(
        "hostile_configs: tried {}, refused {refused} (field named {named}), panics {}, accepted-wrongly {} (KNOWN_GAPS, of {} gap probes); data lost 0",
        cases.len() + gaps.len(),
        panics + gap_panics,
        still.len(),
        gaps.len()
    );
    for g in &still {
        eprintln!("hostile_configs: KNOWN_GAP accepted: {g}");
    }
    assert!(failures.is_empty(), "{} hostile configs mishandled:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(refused, cases.len());
}

/// Every example config parses, and what it parses to serialises and parses back to itself
/// (the round trip the `run_config` fuzz target checks).
#[test]
fn example_configs_round_trip() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let cfg = RunConfig::from_toml(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let text = cfg.to_toml();
            let back = RunConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: re-parse: {e}\n{text}", p.display()));
            assert_eq!(back, cfg, "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 3, "{n} example configs");
}
