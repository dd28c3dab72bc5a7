//! Bad input gets an error naming the file, tensor or field — never a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lockstep_model::{Batch, ModelConfig, MoeCausalLm, Replay, ReplayWeights, RouteMode, RoutingPlan};

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let src = common::fixture(name);
    let dst = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.path().join(f)).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    MoeCausalLm::load(dir, DType::F32, &Device::Cpu).expect_err("load must fail").to_string()
}

fn rewrite_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    f(&mut ts);
    candle_core::safetensors::save(&ts, &path).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_fixture("qwen3_moe_tiny");
    rewrite_weights(d.path(), |ts| {
        ts.remove("model.layers.1.mlp.experts.3.up_proj.weight");
    });
    let e = load_err(d.path());
    assert!(e.contains("model.layers.1.mlp.experts.3.up_proj.weight") && e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape_is_named() {
    let d = copy_fixture("qwen2_moe_tiny");
    rewrite_weights(d.path(), |ts| {
        ts.insert("model.layers.0.self_attn.k_proj.weight".into(), Tensor::zeros((7, 64), DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_err(d.path());
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[7, 64]"), "{e}");
}

#[test]
fn nan_and_infinite_weights_are_refused_by_name() {
    for (bad, name) in [(f32::NAN, "model.layers.0.self_attn.q_proj.weight"), (f32::INFINITY, "model.norm.weight")] {
        let d = copy_fixture("qwen3_moe_tiny");
        rewrite_weights(d.path(), |ts| {
            let t = ts.get(name).unwrap();
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v[3] = bad;
            let shape = t.shape().clone();
            ts.insert(name.into(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
        });
        let e = load_err(d.path());
        assert!(e.contains(name) && e.contains("NaN or infinite"), "{e}");
    }
}

#[test]
fn unknown_architecture_is_named() {
    let d = copy_fixture("qwen3_moe_tiny");
    edit_config(d.path(), |v| v["architectures"] = serde_json::json!(["LlamaForCausalLM"]));
    let e = load_err(d.path());
    assert!(e.contains("architectures") && e.contains("LlamaForCausalLM") && e.contains("config.json"), "{e}");
}

#[test]
fn top_k_beyond_experts_is_named() {
    let d = copy_fixture("qwen3_moe_tiny");
    edit_config(d.path(), |v| v["num_experts_per_tok"] = serde_json::json!(9));
    let e = load_err(d.path());
    assert!(e.contains("num_experts_per_tok") && e.contains("exceeds"), "{e}");
}

#[test]
fn wrong_field_type_and_unsupported_rope_are_named() {
    let d = copy_fixture("qwen3_moe_tiny");
    edit_config(d.path(), |v| v["hidden_size"] = serde_json::json!("sixty-four"));
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
    let d = copy_fixture("qwen3_moe_tiny");
    edit_config(d.path(), |v| v["rope_parameters"]["rope_type"] = serde_json::json!("yarn"));
    let e = load_err(d.path());
    assert!(e.contains("rope_parameters") && e.contains("yarn"), "{e}");
}

#[test]
fn truncated_and_corrupt_safetensors_are_named() {
    let d = copy_fixture("qwen3_moe_tiny");
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");

    let mut corrupt = bytes.clone();
    corrupt[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&path, &corrupt).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(&path, [0u8; 4]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::remove_file(&path).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn sharded_index_naming_a_missing_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    let src = common::extra_fixture("qwen2_moe_sparse_step_bf16_sharded");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(d.path().join("model-00003-of-00005.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00003-of-00005.safetensors"), "{e}");
}

#[test]
fn bad_replay_routes_are_named() {
    let model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let b = Batch::from_sequences(&[vec![1, 2, 3, 4], vec![5, 6]], 0, &Device::Cpu).unwrap();
    let rec = model.forward(&b, &RoutingPlan::record()).unwrap();
    let ids = rec.routes[&0].ids_NK().unwrap().clone();
    let replay = |ids: Tensor| RouteMode::Replay(Replay::top_k(ids, ReplayWeights::Recompute));

    // a layer that is dense (2) or beyond the model (9)
    for layer in [2usize, 9] {
        let e = model.forward(&b, &RoutingPlan::compute().with_layer(layer, replay(ids.clone()))).unwrap_err().to_string();
        assert!(e.contains(&format!("layer {layer}")) && e.contains("not an MoE layer"), "{e}");
    }
    // token count that does not fit
    let short = ids.narrow(0, 0, 5).unwrap();
    let e = model.forward(&b, &RoutingPlan::compute().with_layer(1, replay(short))).unwrap_err().to_string();
    assert!(e.contains("layer 1") && e.contains("[5, 2]"), "{e}");
    // expert id out of range
    let mut v: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    v[3] = 8;
    let bad = Tensor::from_vec(v, ids.dims(), &Device::Cpu).unwrap();
    let e = model.forward(&b, &RoutingPlan::compute().with_layer(3, replay(bad))).unwrap_err().to_string();
    assert!(e.contains("layer 3") && e.contains("expert id 8") && e.contains("num_experts 8"), "{e}");
    // given weights of the wrong shape
    let w = Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap();
    let mode = RouteMode::Replay(Replay::top_k(ids.clone(), ReplayWeights::Given(w)));
    let e = model.forward(&b, &RoutingPlan::compute().with_layer(0, mode)).unwrap_err().to_string();
    assert!(e.contains("layer 0") && e.contains("weights"), "{e}");
}

#[test]
fn bad_batches_are_named() {
    let dev = Device::Cpu;
    let e = Batch::padded(&[vec![1, 2], vec![3]], &[vec![1, 1], vec![1]], &dev).unwrap_err().to_string();
    assert!(e.contains("input_ids"), "{e}");
    let e = Batch::padded(&[vec![1, 2]], &[vec![1, 2]], &dev).unwrap_err().to_string();
    assert!(e.contains("attention_mask"), "{e}");
    let e = Batch::packed(&[1, 2, 3], None, &[0, 2, 5], &dev).unwrap_err().to_string();
    assert!(e.contains("cu_seqlens"), "{e}");
    let model = MoeCausalLm::embedded_default(0, DType::F32, &dev).unwrap();
    let b = Batch::from_sequences(&[vec![1, 999]], 0, &dev).unwrap();
    let e = model.forward(&b, &RoutingPlan::compute()).unwrap_err().to_string();
    assert!(e.contains("input_ids") && e.contains("999"), "{e}");
}

#[test]
fn both_config_spellings_parse_the_same() {
    let t5 = std::fs::read_to_string(common::fixture("qwen3_moe_tiny").join("config.json")).unwrap();
    let mut hub: serde_json::Value = serde_json::from_str(&t5).unwrap();
    let obj = hub.as_object_mut().unwrap();
    let e = obj.remove("num_local_experts").unwrap();
    obj.insert("num_experts".into(), e);
    let theta = obj.remove("rope_parameters").unwrap()["rope_theta"].clone();
    obj.insert("rope_theta".into(), theta);
    let a = ModelConfig::from_json_str(&t5, "t5").unwrap();
    let b = ModelConfig::from_json_str(&hub.to_string(), "hub").unwrap();
    assert_eq!((a.moe.clone(), a.attention.clone()), (b.moe.clone(), b.attention.clone()));
    assert_eq!(a.moe.router.num_experts, 8);
    assert_eq!(a.attention.rope_theta, 10000.0);
    // disagreeing spellings are refused
    let mut both = hub.clone();
    both["num_local_experts"] = serde_json::json!(4);
    let e = ModelConfig::from_json_str(&both.to_string(), "both").unwrap_err().to_string();
    assert!(e.contains("num_experts") && e.contains("num_local_experts"), "{e}");
}

#[test]
fn f16_and_bf16_weight_files_load() {
    // the same checkpoint with its tensors stored as f16 / bf16 loads (converted to f32) and
    // computes logits close to the f32 file's (weights rounded to 11 / 8 mantissa bits)
    let reference = MoeCausalLm::load(&common::fixture("qwen3_moe_tiny"), DType::F32, &Device::Cpu).unwrap();
    let b = Batch::from_sequences(&[vec![1, 2, 3, 4, 5, 6]], 0, &Device::Cpu).unwrap();
    let want = reference.forward(&b, &RoutingPlan::compute()).unwrap().logits;
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let d = copy_fixture("qwen3_moe_tiny");
        rewrite_weights(d.path(), |ts| {
            for t in ts.values_mut() {
                *t = t.to_dtype(dtype).unwrap();
            }
        });
        let m = MoeCausalLm::load(d.path(), DType::F32, &Device::Cpu).unwrap();
        let got = m.forward(&b, &RoutingPlan::compute()).unwrap().logits;
        let (_, rel) = lockstep_model::parity::rel_error(&got, &want).unwrap();
        assert!(rel < tol && rel > 0.0, "{dtype:?}: rel {rel}");
    }
}
