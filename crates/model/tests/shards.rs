//! Sharded random checkpoints (`lockstep_model::shards`, what `lockstep init` writes): the
//! shard split follows huggingface_hub's rule, the index is right, every architecture's
//! checkpoint loads to exactly the in-memory random model of the same seed, bytes are
//! deterministic per seed, and the per-layer size arithmetic equals the full tensor list.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lockstep_model::checkpoint::tensor_specs;
use lockstep_model::shards::{self, check_checkpoint, checkpoint_tensors, plan_shards, read_index, weight_sizes, write_random, FileTensor};
use lockstep_model::{ModelConfig, MoeCausalLm};

/// A tiny LLaDA2-MoE config (fused QKV on disk, q/k/v biases, expert bias, a dense layer).
const LLADA2: &str = r#"{"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 64,
  "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "num_experts": 16, "num_experts_per_tok": 4,
  "score_function": "sigmoid", "moe_router_enable_expert_bias": true, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "num_shared_experts": 1, "first_k_dense_replace": 1,
  "norm_topk_prob": true, "use_qk_norm": true, "use_qkv_bias": true, "use_bias": true, "tie_word_embeddings": false}"#;

/// Every architecture: the transformers fixtures (Qwen3-MoE, Qwen2-MoE, GLM-4.5, a sparse-step
/// and a dense-gap variant), the embedded default and the LLaDA2 config above.
fn configs() -> Vec<(String, ModelConfig)> {
    let mut out = vec![
        ("default".to_string(), lockstep_model::init::default_config()),
        ("llada2".to_string(), ModelConfig::from_json_str(LLADA2, "llada2").unwrap()),
    ];
    for d in ["qwen3_moe_tiny", "qwen2_moe_tiny", "glm4_moe_tiny"] {
        out.push((d.to_string(), ModelConfig::from_file(&common::fixture(d).join("config.json")).unwrap()));
    }
    for d in ["qwen2_moe_sparse_step_bf16_sharded", "qwen3_moe_dense_gaps"] {
        out.push((d.to_string(), ModelConfig::from_file(&common::extra_fixture(d).join("config.json")).unwrap()));
    }
    out
}

fn write(dir: &Path, cfg: &ModelConfig, seed: u64, dtype: DType, max: u64) -> shards::Written {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_string()).unwrap();
    write_random(dir, cfg, seed, dtype, &Device::Cpu, max, &mut |_| {}).unwrap()
}

/// Every parameter of two models, bit for bit.
fn assert_same(a: &MoeCausalLm, b: &MoeCausalLm, what: &str) {
    let (pa, pb) = (a.named_params().unwrap(), b.named_params().unwrap());
    assert_eq!(pa.len(), pb.len(), "{what}");
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb, "{what}");
        assert_eq!(ta.dtype(), tb.dtype(), "{what}: {na}");
        let f = |t: &candle_core::Tensor| -> Vec<u32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect() };
        assert!(f(ta) == f(tb), "{what}: tensor {na} differs");
    }
}

fn files_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v.into_iter().map(|p| (p.file_name().unwrap().into(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn sizes_parse_like_transformers() {
    assert_eq!(shards::parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(shards::parse_size("500MB").unwrap(), 500_000_000);
    assert_eq!(shards::parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(shards::parse_size("64kb").unwrap(), 64_000);
    assert_eq!(shards::parse_size("1.5GB").unwrap(), 1_500_000_000);
    assert_eq!(shards::parse_size("4096").unwrap(), 4096);
    for bad in ["", "0", "GB", "5XB", "-1GB"] {
        let e = shards::parse_size(bad).unwrap_err().to_string();
        assert!(e.contains("expected a size such as 5GB"), "{bad}: {e}");
    }
    assert_eq!(shards::DEFAULT_MAX_SHARD_SIZE, 5_000_000_000);
}

#[test]
fn shards_split_as_huggingface_hub_does() {
    let t = |name: &str, n: usize| FileTensor { name: name.into(), shape: vec![n], parts: vec![0] };
    // f32: 40, 40, 400 (too big: its own shard, before the open one), 40, 80 bytes; max 100
    let ts = [t("a", 10), t("b", 10), t("big", 100), t("c", 10), t("d", 20)];
    let p = plan_shards(&ts, DType::F32, 100).unwrap();
    // a + b (80) fill the open shard; big (> max) gets a shard of its own, listed first; c
    // would tip a + b over 100 (120): a + b close as shard 1, c opens shard 2; d would tip c
    // over (120): d opens shard 3
    assert_eq!(p.shard_of, vec![1, 1, 0, 2, 3]);
    assert_eq!(p.files, (1..=4).map(|i| format!("model-{i:05}-of-00004.safetensors")).collect::<Vec<_>>());
    assert_eq!(p.shard_bytes, vec![400, 80, 40, 80]);
    assert_eq!((p.total_size, p.total_parameters), (600, 150));
    let one = plan_shards(&ts, DType::BF16, 5_000_000_000).unwrap();
    assert_eq!(one.files, vec!["model.safetensors".to_string()]);
    assert!(!one.is_sharded());
}

#[test]
fn round_trip_sharded_index_and_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = lockstep_model::init::default_config();
    let dir = tmp.path().join("ckpt");
    let w = write(&dir, &cfg, 7, DType::F32, 40_000);
    assert!(w.plan.files.len() > 3, "{:?}", w.plan.files);
    assert!(dir.join(shards::INDEX_FILE).exists() && !dir.join(shards::SINGLE_FILE).exists());
    let index = read_index(&dir).unwrap();
    let all = check_checkpoint(&dir).unwrap();
    let specs = tensor_specs(&cfg);
    assert_eq!(index.weight_map.len(), specs.len());
    assert_eq!(all.len(), specs.len());
    let elems: u64 = specs.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    assert_eq!(index.total_size, elems * 4);
    assert_eq!(index.total_parameters, Some(elems));
    for (name, shape) in &specs {
        assert_eq!(&all[name].shape, shape, "{name}");
        assert_eq!(all[name].dtype, "F32");
    }
    // every shard but those of a single big tensor stays under the limit
    for (f, &b) in w.plan.files.iter().zip(&w.plan.shard_bytes) {
        let n = index.weight_map.values().filter(|v| *v == f).count();
        assert!(b <= 40_000 || n == 1, "{f}: {b} bytes in {n} tensors");
    }
    let loaded = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let mem = MoeCausalLm::random(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    assert_same(&loaded, &mem, "default f32");
}

#[test]
fn every_architecture_inits_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, cfg) in configs() {
        for (dtype, max) in [(DType::BF16, 20_000u64), (DType::F32, 5_000_000_000)] {
            let dir = tmp.path().join(format!("{name}-{dtype:?}"));
            let w = write(&dir, &cfg, 3, dtype, max);
            assert_eq!(w.plan.is_sharded(), max == 20_000, "{name}: {:?}", w.plan.files);
            check_checkpoint(&dir).unwrap();
            let loaded = MoeCausalLm::load(&dir, dtype, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mem = MoeCausalLm::random(&cfg, 3, dtype, &Device::Cpu).unwrap();
            assert_same(&loaded, &mem, &format!("{name} {dtype:?}"));
        }
    }
}

#[test]
fn llada2_is_written_under_its_hub_names() {
    let cfg = ModelConfig::from_json_str(LLADA2, "llada2").unwrap();
    let names: Vec<String> = checkpoint_tensors(&cfg).unwrap().into_iter().map(|t| t.name).collect();
    assert!(names.contains(&"model.word_embeddings.weight".to_string()));
    assert!(names.contains(&"model.layers.1.attention.query_key_value.weight".to_string()));
    assert!(names.contains(&"model.layers.1.attention.query_key_value.bias".to_string()));
    assert!(names.contains(&"model.layers.1.mlp.gate.expert_bias".to_string()));
    assert!(!names.iter().any(|n| n.contains("q_proj") || n.contains("embed_tokens")));
    // what `save` writes: the same names
    let tmp = tempfile::tempdir().unwrap();
    MoeCausalLm::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap().save(&tmp.path().join("s")).unwrap();
    let saved: Vec<String> = check_checkpoint(&tmp.path().join("s")).unwrap().into_keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(saved, sorted);
}

#[test]
fn same_seed_same_bytes_other_seed_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = lockstep_model::init::default_config();
    write(&tmp.path().join("a"), &cfg, 11, DType::BF16, 30_000);
    write(&tmp.path().join("b"), &cfg, 11, DType::BF16, 30_000);
    write(&tmp.path().join("c"), &cfg, 12, DType::BF16, 30_000);
    let (a, b, c) = (files_bytes(&tmp.path().join("a")), files_bytes(&tmp.path().join("b")), files_bytes(&tmp.path().join("c")));
    assert!(a.len() > 2);
    assert!(a == b, "same seed, different bytes");
    let names = |v: &[(PathBuf, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&c));
    let shards_differ = a.iter().zip(&c).filter(|((n, _), _)| n.to_string_lossy().starts_with("model-")).all(|((_, x), (_, y))| x != y);
    assert!(shards_differ, "seed 12 left a shard equal to seed 11's");
}

#[test]
fn per_layer_sizes_equal_the_full_list() {
    let mut cases = configs();
    let big = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/configs/qwen3_30b_a3b.json")).unwrap();
    cases.push(("qwen3_30b_a3b".into(), ModelConfig::from_json_str(&big, "qwen3_30b_a3b").unwrap()));
    for (name, cfg) in cases {
        let list = checkpoint_tensors(&cfg).unwrap();
        let s = weight_sizes(&cfg).unwrap();
        assert_eq!(s.parameters, list.iter().map(FileTensor::numel).sum::<u128>(), "{name}");
        assert_eq!(s.tensors, list.len() as u128, "{name}");
        assert_eq!(s.largest.1, list.iter().map(FileTensor::numel).max().unwrap(), "{name}");
        if name == "qwen3_30b_a3b" {
            // Qwen3-30B-A3B: 30.53B parameters (transformers counts the same)
            assert_eq!(s.parameters, 30_532_122_624, "{name}");
            assert_eq!(s.bytes(DType::BF16), 2 * 30_532_122_624);
        }
    }
    // a huge layer count is sized without listing its tensors
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/configs/qwen3_30b_a3b.json")).unwrap()).unwrap();
    v["num_hidden_layers"] = serde_json::json!(1_000_000);
    let huge = ModelConfig::from_json_str(&v.to_string(), "huge").unwrap();
    assert!(weight_sizes(&huge).unwrap().bytes(DType::BF16) > 1_000_000_000_000_000);
}
