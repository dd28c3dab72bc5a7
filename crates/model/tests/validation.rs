//! Config validation before any allocation (bounds, ranges, the weights' size against the
//! memory there is), weight-file strictness (a tensor with no place in the config is named),
//! and the checksum manifest of lockstep's own checkpoints.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lockstep_model::checkpoint::{tensor_specs, LoadOptions};
use lockstep_model::manifest::{self, MANIFEST};
use lockstep_model::{ModelConfig, MoeCausalLm};

const FIXTURES: [&str; 3] = ["qwen3_moe_tiny", "qwen2_moe_tiny", "glm4_moe_tiny"];

fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixture(name).join("config.json")).unwrap()).unwrap()
}

fn parse_err(v: &serde_json::Value) -> String {
    ModelConfig::from_json_str(&v.to_string(), "test.json").expect_err("the config must be refused").to_string()
}

fn with(name: &str, key: &str, value: serde_json::Value) -> serde_json::Value {
    let mut v = fixture_json(name);
    v[key] = value;
    v
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture(name).join(f), dst.path().join(f)).unwrap();
    }
    dst
}

fn add_tensor(dir: &Path, name: &str, t: Tensor) {
    let path = dir.join("model.safetensors");
    let mut ts: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    ts.insert(name.to_string(), t);
    candle_core::safetensors::save(&ts, &path).unwrap();
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&path, v.to_string()).unwrap();
}

fn load(dir: &Path, allow_unused: bool) -> lockstep_model::Result<MoeCausalLm> {
    MoeCausalLm::load_with(dir, DType::F32, &Device::Cpu, &LoadOptions { allow_unused, ..LoadOptions::default() })
}

#[test]
fn a_billion_layers_is_an_error_naming_the_field_not_an_abort() {
    let e = parse_err(&with("qwen3_moe_tiny", "num_hidden_layers", serde_json::json!(1_000_000_000u64)));
    assert!(e.contains("num_hidden_layers") && e.contains("1000000000"), "{e}");
    // every size has an upper bound, checked as it is read
    for (key, value) in [
        ("hidden_size", 1u64 << 30),
        ("num_attention_heads", 1 << 20),
        ("num_key_value_heads", 1 << 20),
        ("head_dim", 1 << 20),
        ("num_local_experts", 1 << 30),
        ("vocab_size", 1 << 40),
        ("intermediate_size", 1 << 40),
        ("moe_intermediate_size", 1 << 40),
        ("max_position_embeddings", 1 << 40),
        ("decoder_sparse_step", 1 << 40),
    ] {
        let e = parse_err(&with("qwen3_moe_tiny", key, serde_json::json!(value)));
        let field = if key == "num_local_experts" { "num_experts" } else { key };
        assert!(e.contains(&format!("`{field}`")) && e.contains("exceeds the limit"), "{key}: {e}");
    }
    let e = parse_err(&with("glm4_moe_tiny", "n_shared_experts", serde_json::json!(1u64 << 40)));
    assert!(e.contains("n_shared_experts"), "{e}");
}

#[test]
fn max_position_embeddings_is_a_positive_integer_or_an_error_naming_it() {
    for bad in [serde_json::json!("big"), serde_json::json!(-5), serde_json::json!(0), serde_json::json!(1.5)] {
        let e = parse_err(&with("qwen3_moe_tiny", "max_position_embeddings", bad.clone()));
        assert!(e.contains("max_position_embeddings"), "{bad}: {e}");
    }
    let ok = |v: serde_json::Value| ModelConfig::from_json_str(&v.to_string(), "t").unwrap().max_position_embeddings;
    assert_eq!(ok(with("qwen3_moe_tiny", "max_position_embeddings", serde_json::json!(2048))), Some(2048));
    let mut v = fixture_json("qwen3_moe_tiny");
    v.as_object_mut().unwrap().remove("max_position_embeddings");
    assert_eq!(ok(v), None, "absent is None (the caller's default), never a silent number");
}

#[test]
fn float_fields_are_range_checked() {
    for eps in [serde_json::json!(0.0), serde_json::json!(-1e-6), serde_json::json!(0.5), serde_json::json!("tiny")] {
        let e = parse_err(&with("qwen3_moe_tiny", "rms_norm_eps", eps.clone()));
        assert!(e.contains("rms_norm_eps"), "{eps}: {e}");
    }
    for theta in [serde_json::json!(0.0), serde_json::json!(-10000.0)] {
        let mut v = fixture_json("qwen3_moe_tiny");
        v["rope_parameters"]["rope_theta"] = theta.clone();
        let e = parse_err(&v);
        assert!(e.contains("rope_theta"), "{theta}: {e}");
    }
    let mut v = fixture_json("qwen3_moe_tiny");
    v["rope_parameters"]["rope_theta"] = serde_json::json!("huge");
    assert!(parse_err(&v).contains("rope_parameters.rope_theta"));
    // head counts and top-k
    assert!(parse_err(&with("qwen3_moe_tiny", "num_key_value_heads", serde_json::json!(3))).contains("num_key_value_heads"));
    assert!(parse_err(&with("qwen3_moe_tiny", "num_experts_per_tok", serde_json::json!(9))).contains("num_experts_per_tok"));
    assert!(parse_err(&with("qwen3_moe_tiny", "num_attention_heads", serde_json::json!(0))).contains("num_attention_heads"));
}

#[test]
fn the_parameter_count_is_the_tensor_lists() {
    let mut cfgs: Vec<(String, ModelConfig)> = FIXTURES.iter().map(|n| (n.to_string(), ModelConfig::from_file(&common::fixture(n).join("config.json")).unwrap())).collect();
    cfgs.push(("default".into(), lockstep_model::init::default_config()));
    let mut tied = fixture_json("qwen3_moe_tiny");
    tied["tie_word_embeddings"] = true.into();
    cfgs.push(("tied".into(), ModelConfig::from_json_str(&tied.to_string(), "t").unwrap()));
    for (name, cfg) in cfgs {
        let listed: u128 = tensor_specs(&cfg).iter().map(|(_, s)| s.iter().product::<usize>() as u128).sum();
        assert_eq!(cfg.param_count(), listed, "{name}");
        assert_eq!(cfg.weight_bytes(DType::BF16), 2 * listed, "{name}");
        let real = MoeCausalLm::random(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let n: usize = real.named_params().unwrap().iter().map(|(_, t)| t.elem_count()).sum();
        let bias: usize = cfg.moe_layers.len() * if cfg.moe.router.expert_bias { cfg.moe.router.num_experts } else { 0 };
        assert_eq!((n + bias) as u128, listed, "{name}: the model's parameters (+ expert biases)");
    }
}

#[test]
fn weights_bigger_than_memory_are_refused_before_any_tensor_is_made() {
    let mut v: serde_json::Value = serde_json::from_str(include_str!("../../../testdata/configs/qwen3_30b_a3b.json")).unwrap();
    let cfg = ModelConfig::from_json_str(&v.to_string(), "q30").unwrap();
    assert_eq!(cfg.param_count(), 30_532_122_624, "Qwen3-30B-A3B (transformers counts the same)");
    let e = cfg.check_fits_in("q30", DType::BF16, 22_000_000_000, "the device cuda:0").unwrap_err().to_string();
    assert!(e.contains("`num_hidden_layers`") && e.contains("61 GB") && e.contains("22 GB") && e.contains("cuda:0"), "{e}");
    cfg.check_fits_in("q30", DType::BF16, 80_000_000_000, "x").unwrap();

    // a million layers parses (sizes are bounded loosely) and is refused for its size, on the
    // host's real memory, by `load` before it opens any weight file (there is none here)
    v["num_hidden_layers"] = serde_json::json!(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let e = MoeCausalLm::load(dir.path(), DType::BF16, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("num_hidden_layers = 1000000: the weights need") && e.contains("PB") && e.contains("MemAvailable"), "{e}");
    // a huge vocabulary names vocab_size
    let mut v = fixture_json("qwen3_moe_tiny");
    v["vocab_size"] = serde_json::json!(1 << 24);
    v["hidden_size"] = serde_json::json!(1 << 17);
    v["head_dim"] = serde_json::json!(16);
    let cfg = ModelConfig::from_json_str(&v.to_string(), "t").unwrap();
    let e = cfg.check_fits_in("t", DType::F32, 1 << 30, "the host").unwrap_err().to_string();
    assert!(e.contains("vocab_size = 16777216") && e.contains("TB"), "{e}");
}

#[test]
fn fixtures_load_strictly() {
    for name in FIXTURES {
        load(&common::fixture(name), false).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn a_tensor_with_no_place_in_the_config_is_named() {
    let d = copy_fixture("qwen3_moe_tiny");
    add_tensor(d.path(), "model.layers.0.mlp.extra_proj.weight", Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap());
    let e = load(d.path(), false).expect_err("refused").to_string();
    assert!(e.contains("model.layers.0.mlp.extra_proj.weight") && e.contains("not in the model"), "{e}");
    load(d.path(), true).expect("allow_unused loads it");

    // a layer past num_hidden_layers (3)
    let d = copy_fixture("qwen3_moe_tiny");
    add_tensor(d.path(), "model.layers.3.input_layernorm.weight", Tensor::ones(64, DType::F32, &Device::Cpu).unwrap());
    add_tensor(d.path(), "model.layers.3.post_attention_layernorm.weight", Tensor::ones(64, DType::F32, &Device::Cpu).unwrap());
    let e = load(d.path(), false).expect_err("refused").to_string();
    assert!(e.contains("model.layers.3.input_layernorm.weight") && e.contains("beyond num_hidden_layers = 3") && e.contains("2 unused tensors"), "{e}");
    // ... unless the config declares it a multi-token-prediction layer (GLM-4.5, DeepSeek-V3)
    edit_config(d.path(), "num_nextn_predict_layers", serde_json::json!(1));
    load(d.path(), false).expect("MTP layers are expected");
}

#[test]
fn tied_embeddings_beside_an_lm_head_is_an_error_unless_allowed() {
    let d = copy_fixture("qwen3_moe_tiny");
    edit_config(d.path(), "tie_word_embeddings", true.into());
    let e = load(d.path(), false).expect_err("refused").to_string();
    assert!(e.contains("lm_head.weight") && e.contains("tie_word_embeddings = true"), "{e}");
    let m = load(d.path(), true).expect("allow_unused");
    assert!(m.cfg.tie_word_embeddings);
}

/// Flip the lowest mantissa bit of the file's last f32 (a weight stays finite and small).
fn flip_last_byte(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let n = b.len();
    b[n - 4] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn our_checkpoints_carry_a_manifest_that_load_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    model.save(&dir).unwrap();
    let m = manifest::read(&dir).unwrap().expect("a manifest");
    assert_eq!(m.keys().collect::<Vec<_>>(), vec!["model.safetensors"]);
    let st = dir.join("model.safetensors");
    assert_eq!(m["model.safetensors"], manifest::sha256_file(&st).unwrap());
    assert_eq!(m["model.safetensors"].bytes, std::fs::metadata(&st).unwrap().len());
    MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // config.json stays editable (not a tensor file)
    edit_config(&dir, "max_position_embeddings", serde_json::json!(512));
    MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();

    // one flipped bit of the weights: the file is named
    let good = std::fs::read(&st).unwrap();
    flip_last_byte(&st);
    let e = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
    assert!(e.contains("model.safetensors") && e.contains("sha256") && e.contains(MANIFEST), "{e}");
    // a truncated file
    std::fs::write(&st, &good[..good.len() - 8]).unwrap();
    let e = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
    assert!(e.contains("model.safetensors") && e.contains("bytes"), "{e}");
    // a tensor file the manifest does not list
    std::fs::write(&st, &good).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
    std::fs::write(dir.join(MANIFEST), serde_json::json!({"other.safetensors": v["model.safetensors"]}).to_string()).unwrap();
    let e = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
    assert!(e.contains("not listed"), "{e}");
    // a garbled manifest
    std::fs::write(dir.join(MANIFEST), "{").unwrap();
    let e = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
    assert!(e.contains(MANIFEST), "{e}");
    // without a manifest it is a foreign checkpoint: accepted as it is (here: the corrupt one,
    // whose flipped bit lands in a weight)
    std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    flip_last_byte(&st);
    MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // skipping the check is an option
    model.save(&dir).unwrap();
    flip_last_byte(&st);
    MoeCausalLm::load_with(&dir, DType::F32, &Device::Cpu, &LoadOptions { verify_manifest: false, ..LoadOptions::default() }).unwrap();
}

#[test]
fn architecture_names_must_agree_and_weights_must_be_floats() {
    let e = parse_err(&with("qwen3_moe_tiny", "architectures", serde_json::json!([])));
    assert!(e.contains("`architectures`") && e.contains("empty"), "{e}");
    let e = parse_err(&with("qwen3_moe_tiny", "model_type", serde_json::json!("llama")));
    assert!(e.contains("`model_type`") && e.contains("llama") && e.contains("qwen3_moe"), "{e}");
    // a weight stored as integers is refused by name, not converted
    let d = copy_fixture("qwen3_moe_tiny");
    let path = d.path().join("model.safetensors");
    let mut ts: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let w = ts.get_mut("model.norm.weight").unwrap();
    *w = w.to_dtype(DType::U32).unwrap();
    candle_core::safetensors::save(&ts, &path).unwrap();
    let e = load(d.path(), false).expect_err("refused").to_string();
    assert!(e.contains("model.norm.weight") && e.contains("U32"), "{e}");
}
