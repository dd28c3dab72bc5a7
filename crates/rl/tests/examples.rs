//! The configs in `examples/` load: `default.toml` is exactly the embedded default, the others
//! validate, and the dataset files they name are shipped.

use std::path::PathBuf;

use lockstep_rl::config::RunConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(name: &str) -> RunConfig {
    let p = root().join("examples").join(name);
    let text = std::fs::read_to_string(&p).unwrap();
    RunConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_example_config_loads() {
    assert_eq!(load("default.toml"), RunConfig::default());
    for name in ["dataset.toml", "http-reward.toml"] {
        let c = load(name);
        assert_eq!(c.task.kind, "dataset");
        for p in [c.task.path.as_ref(), c.task.test_path.as_ref()].into_iter().flatten() {
            assert!(root().join(p).exists(), "{name}: {p} is not shipped");
        }
    }
    assert_eq!(load("http-reward.toml").reward[0].kind, "http");
    let gpu = load("checkpoint-cuda-bf16.toml");
    assert!(gpu.task.chat && gpu.model.checkpoint.is_some() && gpu.eval.pass_k == vec![1, 8]);
    load("replay-joint.toml");
    let listed: Vec<String> = std::fs::read_dir(root().join("examples")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".toml")).collect();
    assert_eq!(listed.len(), 5, "a new example needs a line here: {listed:?}");
}
