//! Every key of the run config is optional with its documented default; unknown keys are
//! refused by name (top level, sections, `[[reward]]` tables); the embedded DEFAULT_TOML is
//! exactly the defaults; the `[task]` / `[[reward]]` / `[eval]` keys are checked by name.

use lockstep_rl::config::{RewardSpec, RunConfig, DEFAULT_TOML};

fn err(text: &str) -> String {
    let e = RunConfig::from_toml(text).unwrap_err().to_string();
    eprintln!("{e}");
    e
}

#[test]
fn the_embedded_default_is_the_defaults() {
    let parsed = RunConfig::from_toml(DEFAULT_TOML).unwrap();
    assert_eq!(parsed, RunConfig::default());
    assert_eq!(RunConfig::default_config(), RunConfig::default());
    // an empty file is the default run too
    assert_eq!(RunConfig::from_toml("").unwrap(), RunConfig::default());
}

#[test]
fn a_file_naming_one_key_loads_with_the_rest_default() {
    let c = RunConfig::from_toml("[rollout]\nprompts_per_step = 4\n").unwrap();
    let mut want = RunConfig::default();
    want.rollout.prompts_per_step = 4;
    assert_eq!(c, want);
    let c = RunConfig::from_toml("steps = 7").unwrap();
    assert_eq!((c.steps, c.rollout.group_size, c.loss.clip_high, c.output.dir.as_str()), (7, 8, 0.28, "runs/default"));
    // a section with one key keeps the section's other defaults
    let c = RunConfig::from_toml("[loss]\nobjective = \"gspo\"\n").unwrap();
    assert_eq!((c.loss.objective.as_str(), c.loss.clip_low, c.loss.is_correction.as_str()), ("gspo", 0.2, "none"));
    // validation still applies to the merged config
    assert!(err("[trainer]\nmini_steps = 40\n").contains("trainer.mini_steps"));
}

#[test]
fn unknown_keys_are_refused_by_name() {
    assert!(err("stepz = 3").contains("stepz"));
    assert!(err("[rollout]\ntemprature = 1.0\n").contains("rollout.temprature"));
    assert!(err("[bogus]\nx = 1\n").contains("bogus"));
    assert!(err("[task]\nkind = \"dataset\"\npath = \"a.jsonl\"\npromt_field = \"q\"\n").contains("task.promt_field"));
    let e = err("[task]\nkind = \"dataset\"\npath = \"a.jsonl\"\n[[reward]]\nkind = \"math\"\ntolerence = 0.1\n");
    assert!(e.contains("tolerence"), "{e}");
    // a key of another reward kind is named with its table
    let e = err("[task]\nkind = \"dataset\"\npath = \"a.jsonl\"\n[[reward]]\nkind = \"exact\"\n[[reward]]\nkind = \"math\"\npattern = \"x\"\n");
    assert!(e.contains("reward[1].pattern") && e.contains("does not apply"), "{e}");
}

#[test]
fn task_reward_and_eval_keys_are_checked_by_name() {
    let ds = "[task]\nkind = \"dataset\"\npath = \"a.jsonl\"\n";
    assert!(err("[task]\nkind = \"dataset\"\n").contains("task.path"));
    assert!(err("[task]\nkind = \"chess\"\n").contains("task.kind"));
    assert!(err(&format!("{ds}test_fraction = 1.5\n")).contains("task.test_fraction"));
    assert!(err(&format!("{ds}stop = [\"\\n\", \"\"]\n")).contains("task.stop[1]"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"regex\"\n")).contains("reward[0].pattern"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"regex\"\npattern = \"(unclosed\"\n")).contains("reward[0].pattern"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"length\"\n")).contains("reward[0].target"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"http\"\nurl = \"localhost:1\"\n")).contains("reward[0].url"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"http\"\nurl = \"http://x\"\nconcurrency = 0\n")).contains("reward[0].concurrency"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"telepathy\"\n")).contains("reward[0].kind"));
    assert!(err(&format!("{ds}[[reward]]\nkind = \"exact\"\nweight = nan\n")).contains("reward[0].weight"));
    assert!(err("[[reward]]\nkind = \"exact\"\n").contains("`reward`"), "the addition task has its own reward");
    assert!(err("[eval]\npass_k = [1, 9]\n").contains("eval.pass_k"), "k beyond group_size 8");
    assert!(err("[eval]\npass_k = [0]\n").contains("eval.pass_k"));
    // a full dataset config prints and parses back to itself
    let text = format!("{ds}test_path = \"b.parquet\"\nchat = true\nstop = [\"\\n\"]\n[eval]\npass_k = [1, 4]\n[[reward]]\nkind = \"math\"\nweight = 0.8\ntolerance = 0.01\n[[reward]]\nkind = \"length\"\nweight = 0.2\ntarget = 8\n");
    let c = RunConfig::from_toml(&text).unwrap();
    assert_eq!(c.reward.len(), 2);
    assert_eq!(c.reward[1], RewardSpec { weight: 0.2, target: Some(8), ..RewardSpec::of("length") });
    assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
}

#[test]
fn over_ranks_http_rewards_are_refused() {
    let c = RunConfig::from_toml("[task]\nkind = \"dataset\"\npath = \"a.jsonl\"\n[[reward]]\nkind = \"http\"\nurl = \"http://127.0.0.1:9\"\n").unwrap();
    assert!(c.validate_ranks(1).is_ok());
    let e = c.validate_ranks(2).unwrap_err().to_string();
    assert!(e.contains("reward[0].kind"), "{e}");
}
