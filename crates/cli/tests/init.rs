//! `lockstep init`: random checkpoints sharded as transformers writes them, loadable by the
//! model crate (the same tensors as the in-memory random model of the seed), for every
//! architecture of the fixtures; deterministic per seed; refusals before anything is made.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use lockstep_model::shards::{check_checkpoint, read_index, INDEX_FILE, SINGLE_FILE};
use lockstep_model::{ModelConfig, MoeCausalLm};

fn init(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).arg("init").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// config.json of every fixture checkpoint (testdata and, where present, ../shared/fixtures).
fn fixture_configs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in ["testdata/fixtures", "testdata/extra_fixtures", "../shared/fixtures"] {
        let Ok(rd) = std::fs::read_dir(root().join(d)) else { continue };
        let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path().join("config.json")).filter(|p| p.is_file()).collect();
        v.sort();
        out.extend(v);
    }
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn params_bits(m: &MoeCausalLm) -> Vec<(String, Vec<u32>)> {
    m.named_params()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()))
        .collect()
}

#[test]
fn init_load_round_trip_sharded() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = root().join("testdata/fixtures/qwen3_moe_tiny/config.json");
    let out = tmp.path().join("ckpt");
    let (ok, stdout, err) = init(&["--config", s(&cfg_path), "--out", s(&out), "--dtype", "f32", "--seed", "5", "--max-shard-size", "50KB"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("weight files") && stdout.contains(INDEX_FILE), "{stdout}");
    let index = read_index(&out).unwrap();
    let files: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
    assert!(files.len() >= 3, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(**f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
    }
    check_checkpoint(&out).unwrap();
    // config.json normalised, the fixture's generation_config.json copied
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(v["dtype"], "float32");
    assert!(out.join("generation_config.json").is_file());
    let cfg = ModelConfig::from_file(&cfg_path).unwrap();
    let loaded = MoeCausalLm::load(&out, DType::F32, &Device::Cpu).unwrap();
    let mem = MoeCausalLm::random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    assert!(params_bits(&loaded) == params_bits(&mem), "the loaded checkpoint is not MoeCausalLm::random(seed 5)");
    // no temporary directory is left beside it
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ckpt")]);
}

#[test]
fn every_fixture_architecture_inits_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let configs = fixture_configs();
    assert!(configs.len() >= 5, "{configs:?}");
    let mut archs = std::collections::BTreeSet::new();
    for (i, c) in configs.iter().enumerate() {
        let out = tmp.path().join(format!("m{i}"));
        let (ok, _, err) = init(&["--config", s(c), "--out", s(&out), "--seed", "1", "--max-shard-size", "100KB"]);
        assert!(ok, "{}: {err}", c.display());
        let cfg = ModelConfig::from_file(c).unwrap();
        archs.insert(cfg.architecture.hf_name());
        let loaded = MoeCausalLm::load(&out, DType::BF16, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
        let mem = MoeCausalLm::random(&cfg, 1, DType::BF16, &Device::Cpu).unwrap();
        assert!(params_bits(&loaded) == params_bits(&mem), "{}", c.display());
    }
    assert!(archs.len() >= 3, "{archs:?}");
}

#[test]
fn same_seed_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = root().join("testdata/fixtures/glm4_moe_tiny/config.json");
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let (ok, _, err) = init(&["--config", s(&cfg), "--out", s(&out), "--seed", seed]);
        assert!(ok, "{err}");
        std::fs::read(out.join(SINGLE_FILE)).unwrap()
    };
    let (a, b, c) = (run("a", "9"), run("b", "9"), run("c", "10"));
    assert!(a == b, "same seed, different bytes");
    assert!(a != c && a.len() == c.len());
}

#[test]
fn too_big_for_the_disk_is_refused_before_anything_is_made() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("testdata/configs/qwen3_30b_a3b.json")).unwrap()).unwrap();
    v["num_hidden_layers"] = serde_json::json!(1_000_000);
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let out = tmp.path().join("huge");
    let t0 = std::time::Instant::now();
    let (ok, _, err) = init(&["--config", s(&cfg), "--out", s(&out)]);
    assert!(!ok);
    // 1M layers × 623M parameters in bf16: 1.2 PB
    assert!(err.contains("the weights need 1246") && err.contains("GB (623121") && err.contains(" GB free") && err.contains(s(tmp.path())), "{err}");
    assert!(!out.exists());
    assert!(t0.elapsed().as_secs() < 30, "sized without listing the tensors");
}

#[test]
fn flags_and_out_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = root().join("testdata/fixtures/qwen2_moe_tiny/config.json");
    let out = tmp.path().join("o");
    let (ok, _, err) = init(&["--config", s(&cfg), "--out", s(&out), "--max-shard-size", "5XB"]);
    assert!(!ok && err.contains("--max-shard-size `5XB`: expected a size"), "{err}");
    let (ok, _, err) = init(&["--config", s(&cfg), "--out", s(&out), "--dtype", "f8"]);
    assert!(!ok && err.contains("--dtype `f8`"), "{err}");
    let (ok, _, err) = init(&["--config", "/nonexistent/config.json", "--out", s(&out)]);
    assert!(!ok && err.contains("--config /nonexistent/config.json"), "{err}");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let (ok, _, err) = init(&["--config", s(&cfg), "--out", s(&out)]);
    assert!(!ok && err.contains("exists and is not empty (pass --force"), "{err}");
    assert!(out.join("keep.txt").exists());
    let (ok, _, err) = init(&["--config", s(&cfg), "--out", s(&out), "--force"]);
    assert!(ok, "{err}");
    assert!(!out.join("keep.txt").exists() && out.join(SINGLE_FILE).exists());
}
