//! LLaDA2-MoE details: group-limited selection masks the experts of dropped groups with −∞
//! (checked by hand with all biased scores negative, through the router, and against brute
//! force); `use_qkv_bias` / `use_bias` are read and the q/k/v biases load and save; weights load
//! under LLaDA2's own tensor names (fused `attention.query_key_value`, `attention.dense`,
//! `word_embeddings`, `mlp.gate.expert_bias`, ...) to the same logits as the Qwen-named
//! equivalent, and a LLaDA2 model saves under those names.
//!
//! Legend: N tokens, E experts, K experts per token, G groups.
#![allow(non_snake_case)] // shape-suffixed names (choice_NE) are the convention here

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lockstep_model::checkpoint::{llada2_source, Llada2Source};
use lockstep_model::config::{Architecture, RouterConfig};
use lockstep_model::init::random_weights;
use lockstep_model::moe::router::select::{self, TopK};
use lockstep_model::moe::router::token_choice;
use lockstep_model::{Batch, ModelConfig, MoeCausalLm, RoutingPlan};
use rand::{Rng, SeedableRng};

/// A tiny LLaDA2-MoE config: layer 0 dense, layer 1 MoE (16 experts in 4 groups, top-2 groups,
/// top-4), sigmoid router with expert bias, one shared expert, QK-norm, partial rotary, and the
/// given bias keys.
fn llada2_json(bias_keys: &str) -> String {
    format!(
        r#"{{"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 64,
  "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "num_experts": 16, "num_experts_per_tok": 4,
  "score_function": "sigmoid", "moe_router_enable_expert_bias": true, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "num_shared_experts": 1, "first_k_dense_replace": 1,
  "norm_topk_prob": true, "use_qk_norm": true, "tie_word_embeddings": false{bias_keys}}}"#
    )
}

fn cfg_of(json: &str) -> ModelConfig {
    ModelConfig::from_json_str(json, "test").unwrap()
}

fn batch() -> Batch {
    Batch::from_sequences(&[vec![1, 5, 9, 2, 33, 7, 7, 60], vec![3, 4, 11, 50, 0]], 0, &Device::Cpu).unwrap()
}

fn logits(model: &MoeCausalLm) -> Vec<f32> {
    model.forward(&batch(), &RoutingPlan::compute()).unwrap().logits.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Qwen-style named random weights with every bias non-zero (random_weights zeroes `.bias`).
fn qwen_weights(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut ws = random_weights(cfg, seed, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 100);
    for (name, t) in ws.iter_mut() {
        if name.ends_with(".bias") {
            let v: Vec<f32> = (0..t.elem_count()).map(|_| rng.random_range(-0.3f32..0.3)).collect();
            *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        }
    }
    ws
}

/// The same tensors under LLaDA2's names, converted here independently of the crate's mapping:
/// renames by substring, q/k/v of each layer concatenated along rows into query_key_value.
fn to_llada2_here(ws: &HashMap<String, Tensor>, layers: usize) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in ws {
        if name.contains(".self_attn.q_proj.") || name.contains(".self_attn.k_proj.") || name.contains(".self_attn.v_proj.") {
            continue;
        }
        let n = name
            .replace("model.embed_tokens.", "model.word_embeddings.")
            .replace(".self_attn.o_proj.", ".attention.dense.")
            .replace(".self_attn.q_norm.", ".attention.query_layernorm.")
            .replace(".self_attn.k_norm.", ".attention.key_layernorm.")
            .replace(".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias");
        assert!(!n.contains("self_attn"), "{n}");
        out.insert(n, t.clone());
    }
    for l in 0..layers {
        for suffix in ["weight", "bias"] {
            let part = |p: &str| ws.get(&format!("model.layers.{l}.self_attn.{p}_proj.{suffix}"));
            if let (Some(q), Some(k), Some(v)) = (part("q"), part("k"), part("v")) {
                out.insert(format!("model.layers.{l}.attention.query_key_value.{suffix}"), Tensor::cat(&[q, k, v], 0).unwrap());
            }
        }
    }
    out
}

/// `config.json` plus the tensors, sharded over two files with an index (as the hub ships them).
fn write_sharded(dir: &Path, config_json: &str, ws: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    let mut names: Vec<&String> = ws.keys().collect();
    names.sort();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, n) in names.into_iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        let shard = if i % 2 == 0 { &mut a } else { &mut b };
        shard.insert(n.clone(), ws[n].clone());
        map.insert(n.clone(), serde_json::Value::String(file.into()));
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn write_single(dir: &Path, config_json: &str, ws: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    candle_core::safetensors::save(ws, dir.join("model.safetensors")).unwrap();
}

// ---------------------------------------------------------------- group-limited selection

#[test]
fn negative_biased_scores_stay_in_the_chosen_groups_by_hand() {
    // 8 experts in 4 groups of 2, keep 2 groups, top-3; every biased score negative.
    let v = [-0.9f32, -0.8, -0.1, -0.7, -0.3, -0.2, -0.6, -0.95];
    // group score = sum of the group's two best: g0 −1.7, g1 −0.8, g2 −0.5, g3 −1.55
    // → keep g2, g1 (experts 2..6) → top-3 of {2: −0.1, 3: −0.7, 4: −0.3, 5: −0.2} = 2, 5, 4.
    // (With the old 0.0 mask, experts 0, 1, 6, 7 scored 0 > every kept score: ids 0, 1, 6 —
    // all three outside the chosen groups.)
    let want = vec![2, 5, 4];
    assert_eq!(select::select_row(&v, 4, 2, 3), want);
    let mut rc = RouterConfig::softmax_top_k(8, 3, true);
    rc.n_group = 4;
    rc.topk_group = 2;
    assert_eq!(token_choice::select_row(&v, &rc), want);
    // the CPU custom op the router runs (the same rule on CUDA: route.cu)
    let choice_NE = Tensor::from_vec(v.to_vec(), (1, 8), &Device::Cpu).unwrap();
    let ids = TopK { n_group: 4, topk_group: 2, k: 3 }.apply(&choice_NE).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![2, 5, 4]]);
    // K = every expert of the kept groups: all of them, none outside
    assert_eq!(select::select_row(&v, 4, 2, 4), vec![2, 5, 4, 3]);
}

/// The G' best groups of one row of biased scores (group score = sum of the two best values;
/// ties to the lower group), by sorting.
fn best_groups(biased: &[f32], groups: usize, keep: usize) -> Vec<usize> {
    let per = biased.len() / groups;
    let score = |g: usize| {
        let mut v: Vec<f32> = biased[g * per..(g + 1) * per].to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        v[0] + v[1]
    };
    let mut gs: Vec<usize> = (0..groups).collect();
    gs.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    gs.truncate(keep);
    gs
}

#[test]
fn router_with_all_negative_biased_scores_picks_inside_the_chosen_groups() {
    let cfg = cfg_of(&llada2_json(r#", "use_qkv_bias": false, "use_bias": false"#));
    let mut model = MoeCausalLm::random(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    // sigmoid scores lie in (0, 1): a bias in [−3, −2] makes every biased score negative
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let bias: Vec<f32> = (0..16).map(|_| rng.random_range(-3.0f32..-2.0)).collect();
    model.moe_block_mut(1).unwrap().router.expert_bias = Some(Tensor::from_vec(bias.clone(), 16, &Device::Cpu).unwrap());
    let out = model.forward(&batch(), &RoutingPlan::record()).unwrap();
    let route = &out.routes[&1];
    let scores: Vec<Vec<f32>> = route.scores_NE.to_vec2().unwrap();
    let ids: Vec<Vec<u32>> = route.ids_NK().unwrap().to_vec2().unwrap();
    let weights: Vec<f32> = route.weight_A.to_vec1().unwrap();
    for (n, (s, picked)) in scores.iter().zip(&ids).enumerate() {
        let biased: Vec<f32> = s.iter().zip(&bias).map(|(a, b)| a + b).collect();
        assert!(biased.iter().all(|&x| x < 0.0));
        let groups = best_groups(&biased, 4, 2);
        // hand selection: the 4 best biased scores among the 8 experts of the kept groups
        let mut inside: Vec<usize> = (0..16).filter(|e| groups.contains(&(e / 4))).collect();
        inside.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
        let want: Vec<u32> = inside[..4].iter().map(|&e| e as u32).collect();
        assert_eq!(picked, &want, "token {n}: groups {groups:?}, biased {biased:?}");
        assert!(picked.iter().all(|&e| groups.contains(&(e as usize / 4))), "token {n}");
        // weights: unbiased sigmoid scores at the ids, / (Σ + 1e-20), × routed_scaling_factor
        let sel: Vec<f32> = picked.iter().map(|&e| s[e as usize]).collect();
        let sum: f32 = sel.iter().sum::<f32>() + 1e-20;
        for (j, &x) in sel.iter().enumerate() {
            let w = x / sum * 2.5;
            assert!((weights[n * 4 + j] - w).abs() <= 1e-6 * w.abs().max(1.0), "token {n} slot {j}: {} vs {w}", weights[n * 4 + j]);
        }
    }
}

/// Lexicographically smallest index set of size m maximising Σ v (select_row's tie rule).
fn brute_best(v: &[f32], m: usize) -> Vec<usize> {
    let n = v.len();
    let mut best: Option<(f32, Vec<usize>)> = None;
    for mask in 0u32..(1 << n) {
        if mask.count_ones() as usize != m {
            continue;
        }
        let set: Vec<usize> = (0..n).filter(|i| mask >> i & 1 == 1).collect();
        let sum: f32 = set.iter().map(|&i| v[i]).sum();
        let better = match &best {
            None => true,
            Some((s, b)) => sum > *s || (sum == *s && set < *b),
        };
        if better {
            best = Some((sum, set));
        }
    }
    best.unwrap().1
}

#[test]
fn group_limited_selection_equals_brute_force_with_neg_inf_mask() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut rc = RouterConfig::softmax_top_k(16, 4, true);
    rc.n_group = 4;
    rc.topk_group = 2;
    for trial in 0..500 {
        // few distinct values → many ties; many negative, some rows all negative
        let shift = if trial % 3 == 0 { -3.0 } else { 0.0 };
        let v: Vec<f32> = (0..16).map(|_| rng.random_range(-2i32..6) as f32 * 0.25 + shift).collect();
        let group_scores: Vec<f32> = v.chunks(4).map(|g| brute_best(g, 2).iter().map(|&i| g[i]).sum()).collect();
        let groups = brute_best(&group_scores, 2);
        let masked: Vec<f32> =
            v.iter().enumerate().map(|(i, &s)| if groups.contains(&(i / 4)) { s } else { f32::NEG_INFINITY }).collect();
        let want = brute_best(&masked, 4);
        let mut got = token_choice::select_row(&v, &rc);
        assert!(got.iter().all(|&e| groups.contains(&(e / 4))), "trial {trial}: {got:?} outside {groups:?}");
        got.sort_unstable();
        assert_eq!(got, want, "trial {trial}: scores {v:?}");
    }
}

// ---------------------------------------------------------------- use_qkv_bias / use_bias

#[test]
fn use_qkv_bias_and_use_bias_are_read() {
    let c = cfg_of(&llada2_json(r#", "use_qkv_bias": true, "use_bias": false"#));
    assert_eq!(c.architecture, Architecture::Llada2Moe);
    assert!(c.attention.qkv_bias && !c.attention.o_bias);
    let c = cfg_of(&llada2_json(r#", "use_qkv_bias": false, "use_bias": true"#));
    assert!(!c.attention.qkv_bias && c.attention.o_bias);
    // absent: LLaDA2MoeConfig's defaults (use_qkv_bias=False, use_bias=True)
    let c = cfg_of(&llada2_json(""));
    assert!(!c.attention.qkv_bias && c.attention.o_bias);
    // `attention_bias` is not an LLaDA2 key and no longer decides either bias
    let c = cfg_of(&llada2_json(r#", "attention_bias": true, "use_qkv_bias": false, "use_bias": false"#));
    assert!(!c.attention.qkv_bias && !c.attention.o_bias);
}

#[test]
fn qkv_biases_are_built_used_saved_and_loaded() {
    let json = llada2_json(r#", "use_qkv_bias": true, "use_bias": false"#);
    let cfg = cfg_of(&json);
    let ws = qwen_weights(&cfg, 5);
    let model = MoeCausalLm::new(&cfg, VarBuilder::from_tensors(ws.clone(), DType::F32, &Device::Cpu)).unwrap();
    for layer in &model.layers {
        let a = &layer.self_attn;
        assert!(a.q_proj.bias().is_some() && a.k_proj.bias().is_some() && a.v_proj.bias().is_some());
        assert!(a.o_proj.bias().is_none());
    }
    // the biases take part in the forward
    let mut zero = ws.clone();
    for (n, t) in zero.iter_mut() {
        if n.ends_with("_proj.bias") && n.contains("self_attn") {
            *t = t.zeros_like().unwrap();
        }
    }
    let unbiased = MoeCausalLm::new(&cfg, VarBuilder::from_tensors(zero, DType::F32, &Device::Cpu)).unwrap();
    let want = logits(&model);
    assert_ne!(bits(&want), bits(&logits(&unbiased)));

    // save: LLaDA2's names, the biases fused into query_key_value.bias [(H + 2G)·Dh]
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    model.save(&dir).unwrap();
    let saved = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for l in 0..2 {
        let b = &saved[&format!("model.layers.{l}.attention.query_key_value.bias")];
        assert_eq!(b.dims(), &[(4 + 2 * 2) * 8]);
        let q = ws[&format!("model.layers.{l}.self_attn.q_proj.bias")].to_vec1::<f32>().unwrap();
        let k = ws[&format!("model.layers.{l}.self_attn.k_proj.bias")].to_vec1::<f32>().unwrap();
        let v = ws[&format!("model.layers.{l}.self_attn.v_proj.bias")].to_vec1::<f32>().unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), [q, k, v].concat());
        assert!(!saved.contains_key(&format!("model.layers.{l}.attention.dense.bias")));
    }
    assert!(saved.keys().all(|n| !n.contains("self_attn") && !n.contains("embed_tokens")), "{:?}", saved.keys());

    // load: the same biases, the same logits
    let back = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    for (a, b) in model.layers.iter().zip(&back.layers) {
        for (x, y) in [(&a.self_attn.q_proj, &b.self_attn.q_proj), (&a.self_attn.k_proj, &b.self_attn.k_proj), (&a.self_attn.v_proj, &b.self_attn.v_proj)] {
            assert_eq!(x.bias().unwrap().to_vec1::<f32>().unwrap(), y.bias().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    assert_eq!(bits(&want), bits(&logits(&back)));
}

// ---------------------------------------------------------------- LLaDA2 tensor names

#[test]
fn llada2_named_checkpoint_loads_to_the_qwen_named_logits() {
    // o bias on too, so attention.dense.bias is exercised
    let json = llada2_json(r#", "use_qkv_bias": true, "use_bias": true"#);
    let cfg = cfg_of(&json);
    let qwen = qwen_weights(&cfg, 9);
    let llada = to_llada2_here(&qwen, cfg.num_layers);
    // the names LLaDA2MoeModelLM's state dict has (modeling_llada2_moe.py)
    for n in [
        "model.word_embeddings.weight",
        "model.layers.0.attention.query_key_value.weight",
        "model.layers.0.attention.query_key_value.bias",
        "model.layers.0.attention.dense.weight",
        "model.layers.0.attention.dense.bias",
        "model.layers.0.attention.query_layernorm.weight",
        "model.layers.0.attention.key_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.expert_bias",
        "model.layers.1.mlp.experts.15.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(llada.contains_key(n), "{n}");
    }
    assert_eq!(llada["model.layers.0.attention.query_key_value.weight"].dims(), &[64, 32]);
    assert!(llada.keys().all(|n| !n.contains("self_attn")));

    let tmp = tempfile::tempdir().unwrap();
    let (qdir, ldir) = (tmp.path().join("qwen"), tmp.path().join("llada2"));
    write_single(&qdir, &json, &qwen);
    write_sharded(&ldir, &json, &llada);
    let from_qwen = MoeCausalLm::load(&qdir, DType::F32, &Device::Cpu).unwrap();
    let from_llada = MoeCausalLm::load(&ldir, DType::F32, &Device::Cpu).unwrap();
    let want = logits(&from_qwen);
    assert_eq!(bits(&want), bits(&logits(&from_llada)));
    // every parameter and the expert bias buffer identical
    let (pa, pb) = (from_qwen.named_params().unwrap(), from_llada.named_params().unwrap());
    assert_eq!(pa.len(), pb.len());
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let (a, b): (Vec<f32>, Vec<f32>) = (ta.flatten_all().unwrap().to_vec1().unwrap(), tb.flatten_all().unwrap().to_vec1().unwrap());
        assert_eq!(bits(&a), bits(&b), "{na}");
    }
    let eb = |m: &MoeCausalLm| m.moe_block(1).unwrap().router.expert_bias.as_ref().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(eb(&from_qwen), eb(&from_llada));
    // bf16 checkpoints (the hub's dtype) convert on load the same way
    let bf16: HashMap<String, Tensor> = llada.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).unwrap())).collect();
    let bdir = tmp.path().join("llada2-bf16");
    write_single(&bdir, &json, &bf16);
    let m = MoeCausalLm::load(&bdir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(logits(&m).len(), want.len());

    // a save of the LLaDA2-loaded model writes the hub names back, and reloads to the same logits
    let sdir = tmp.path().join("saved");
    from_llada.save(&sdir).unwrap();
    let saved = candle_core::safetensors::load(sdir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut a: Vec<&String> = saved.keys().collect();
    let mut b: Vec<&String> = llada.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "saved names = LLaDA2's names");
    assert_eq!(bits(&want), bits(&logits(&MoeCausalLm::load(&sdir, DType::F32, &Device::Cpu).unwrap())));
}

#[test]
fn llada2_source_splits_the_fused_qkv_in_q_k_v_order() {
    let cfg = cfg_of(&llada2_json(r#", "use_qkv_bias": true"#));
    // H·Dh = 32, G·Dh = 16: q rows 0..32, k 32..48, v 48..64
    let fused = "model.layers.1.attention.query_key_value.weight".to_string();
    let at = |n: &str| llada2_source(&cfg, n);
    assert_eq!(at("model.layers.1.self_attn.q_proj.weight"), Llada2Source::Qkv { fused: fused.clone(), part: 0, rows: 0..32, total: 64 });
    assert_eq!(at("model.layers.1.self_attn.k_proj.weight"), Llada2Source::Qkv { fused: fused.clone(), part: 1, rows: 32..48, total: 64 });
    assert_eq!(at("model.layers.1.self_attn.v_proj.weight"), Llada2Source::Qkv { fused, part: 2, rows: 48..64, total: 64 });
    assert_eq!(at("model.layers.1.mlp.gate.e_score_correction_bias"), Llada2Source::Renamed("model.layers.1.mlp.gate.expert_bias".into()));
    assert_eq!(at("model.layers.1.mlp.experts.3.up_proj.weight"), Llada2Source::Renamed("model.layers.1.mlp.experts.3.up_proj.weight".into()));
    assert_eq!(at("lm_head.weight"), Llada2Source::Renamed("lm_head.weight".into()));
}

#[test]
fn broken_llada2_checkpoints_name_the_llada2_tensor() {
    let json = llada2_json(r#", "use_qkv_bias": true, "use_bias": false"#);
    let cfg = cfg_of(&json);
    let llada = to_llada2_here(&qwen_weights(&cfg, 1), cfg.num_layers);
    let tmp = tempfile::tempdir().unwrap();
    let load = |ws: &HashMap<String, Tensor>, name: &str| {
        let dir = tmp.path().join(name);
        write_single(&dir, &json, ws);
        MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string()
    };
    // fused QKV with the wrong number of rows: named, with the full shape the config implies
    let mut bad = llada.clone();
    bad.insert("model.layers.1.attention.query_key_value.weight".into(), Tensor::zeros((48, 32), DType::F32, &Device::Cpu).unwrap());
    let e = load(&bad, "rows");
    assert!(e.contains("model.layers.1.attention.query_key_value.weight") && e.contains("[48, 32]") && e.contains("[64, 32]"), "{e}");
    // a missing tensor is named under LLaDA2's name
    let mut bad = llada.clone();
    bad.remove("model.layers.0.attention.dense.weight");
    let e = load(&bad, "missing");
    assert!(e.contains("model.layers.0.attention.dense.weight") && e.contains("missing"), "{e}");
    let mut bad = llada.clone();
    bad.remove("model.layers.1.mlp.gate.expert_bias");
    let e = load(&bad, "no-bias");
    assert!(e.contains("model.layers.1.mlp.gate.expert_bias"), "{e}");
}
