//! Routers as stages: every router against an independent dense reference (all experts on all
//! tokens, combined with the dense [N, E] weight matrix the route implies); expert-choice
//! capacity; group-limited selection against brute force (ties included); routing-health
//! metrics against hand-computed values; bad router configs.

use candle_core::{DType, Device, Module, Tensor};
use lockstep_model::config::{AttentionMode, Pool, RouterConfig, RoutingStrategy, ScoreFunction};
use lockstep_model::metrics::{layer_health, max_vio};
use lockstep_model::model::Mlp;
use lockstep_model::moe::router::expert_choice::{capacity, pools};
use lockstep_model::moe::router::token_choice::select_row;
use lockstep_model::moe::MoeBlock;
use lockstep_model::{Batch, LayerRoute, ModelConfig, MoeCausalLm, RouteMode, RoutingPlan};
use rand::{Rng, SeedableRng};

const BASE: &str = r#""vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "rms_norm_eps": 1e-6, "rope_theta": 10000.0"#;

fn cfg(extra: &str) -> ModelConfig {
    ModelConfig::from_json_str(&format!("{{{BASE}, {extra}}}"), "test").unwrap()
}

fn qwen3(extra: &str) -> ModelConfig {
    cfg(&format!(r#""architectures": ["Qwen3MoeForCausalLM"], {extra}"#))
}

fn glm4(extra: &str) -> ModelConfig {
    cfg(&format!(
        r#""architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "n_shared_experts": 1,
        "norm_topk_prob": true, "first_k_dense_replace": 0, "use_qk_norm": true, "partial_rotary_factor": 0.5 {extra}"#
    ))
}

fn block_of(model: &MoeCausalLm) -> &MoeBlock {
    match &model.layers[model.cfg.moe_layers[0]].mlp {
        Mlp::Moe(b) => b,
        Mlp::Dense(_) => unreachable!(),
    }
}

/// A batch layout (3 sequences, right-padded) and random router inputs for it.
fn inputs(d: usize) -> (Batch, Tensor) {
    let seqs: Vec<Vec<u32>> = vec![(0..13).collect(), (0..7).collect(), (0..10).collect()];
    let batch = Batch::from_sequences(&seqs, 0, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (batch.num_slots(), d), &Device::Cpu).unwrap();
    (batch, x)
}

/// Σ_e W[n, e] · expert_e(x_n) (+ shared expert), every expert on every token.
fn dense_reference(block: &MoeBlock, route: &LayerRoute, x: &Tensor) -> Tensor {
    let (n, _) = x.dims2().unwrap();
    let e = block.experts.num_experts();
    let (tok, exp) = route.pairs().unwrap();
    let w: Vec<f32> = route.weight_A.to_vec1().unwrap();
    let mut dense = vec![0f32; n * e];
    for ((&t, &x), &w) in tok.iter().zip(&exp).zip(&w) {
        dense[t as usize * e + x as usize] += w;
    }
    let dense = Tensor::from_vec(dense, (n, e), &Device::Cpu).unwrap();
    let f = block.experts.down_proj.dim(2).unwrap();
    let mut out = x.zeros_like().unwrap();
    for ex in 0..e {
        let h = x.matmul(&block.experts.gate_up_proj.get(ex).unwrap().t().unwrap()).unwrap();
        let a = (h.narrow(1, 0, f).unwrap().silu().unwrap() * h.narrow(1, f, f).unwrap()).unwrap();
        let y = a.matmul(&block.experts.down_proj.get(ex).unwrap().t().unwrap()).unwrap();
        out = (out + y.broadcast_mul(&dense.narrow(1, ex, 1).unwrap()).unwrap()).unwrap();
    }
    if let Some(s) = &block.shared {
        let mut y = s.mlp.forward(x).unwrap();
        if let Some(g) = &s.gate {
            y = y.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(x).unwrap()).unwrap()).unwrap();
        }
        out = (out + y).unwrap();
    }
    out
}

fn check_against_dense(mut model: MoeCausalLm, strategy: RoutingStrategy, attention: AttentionMode, name: &str) {
    model.set_routing(strategy, attention, false).unwrap();
    let block = block_of(&model);
    let (batch, x) = inputs(model.cfg.hidden_size);
    let (out, route) = block.forward(&x, &RouteMode::Record, 0, &batch).unwrap();
    let reference = dense_reference(block, &route, &x);
    let err = (&out - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err <= 1e-5 * scale, "{name}: max err {err} (scale {scale})");
}

#[test]
fn every_router_equals_dense_reference() {
    let dev = Device::Cpu;
    let tc = RoutingStrategy::TokenChoice;
    let causal = AttentionMode::Causal;
    let bi = AttentionMode::Bidirectional;
    let cases: Vec<(&str, ModelConfig, RoutingStrategy, AttentionMode)> = vec![
        ("softmax renorm", qwen3(r#""num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true"#), tc, causal),
        ("softmax no renorm top-3", qwen3(r#""num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": false"#), tc, causal),
        (
            "softmax + gated shared expert",
            cfg(r#""architectures": ["Qwen2MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 24"#),
            tc,
            causal,
        ),
        ("sigmoid + bias + groups + scaling + shared", glm4(""), tc, causal),
        (
            "expert choice softmax, sequence pool",
            qwen3(r#""num_experts": 8, "num_experts_per_tok": 2"#),
            RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Sequence },
            bi,
        ),
        (
            "expert choice sigmoid, batch pool",
            cfg(r#""architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1"#),
            RoutingStrategy::ExpertChoice { capacity_factor: 1.5, pool: Pool::Batch },
            bi,
        ),
        (
            "expert choice, block:4 pool",
            qwen3(r#""num_experts": 8, "num_experts_per_tok": 2"#),
            RoutingStrategy::ExpertChoice { capacity_factor: 2.0, pool: Pool::Block(4) },
            AttentionMode::Block(4),
        ),
    ];
    for (i, (name, c, s, a)) in cases.into_iter().enumerate() {
        let model = MoeCausalLm::random(&c, 40 + i as u64, DType::F32, &dev).unwrap();
        check_against_dense(model, s, a, name);
    }
}

#[test]
fn expert_choice_fills_exactly_capacity_per_pool() {
    assert_eq!(capacity(1.0, 16, 8), 2);
    assert_eq!(capacity(1.25, 16, 8), 3); // 2.5 rounds up
    assert_eq!(capacity(0.5, 3, 8), 1); // 0.1875 rounds up to 1
    assert_eq!(capacity(100.0, 5, 8), 5); // never more than the pool
    assert_eq!(capacity(0.1, 10, 1), 1);
    let c = qwen3(r#""num_experts": 8, "num_experts_per_tok": 2"#);
    let mut model = MoeCausalLm::random(&c, 7, DType::F32, &Device::Cpu).unwrap();
    let (batch, x) = inputs(c.hidden_size);
    for pool in [Pool::Sequence, Pool::Batch, Pool::Block(4), Pool::Block(1)] {
        let ps = pools(&batch, pool);
        assert_eq!(ps.iter().map(Vec::len).sum::<usize>(), 30, "{pool:?}: every real token in one pool");
        for cf in [0.25, 0.5, 1.0, 1.25, 2.0, 8.0] {
            let s = RoutingStrategy::ExpertChoice { capacity_factor: cf, pool };
            model.set_routing(s, AttentionMode::Bidirectional, false).unwrap();
            let (_, route) = block_of(&model).forward(&x, &RouteMode::Record, 0, &batch).unwrap();
            let (tok, exp) = route.pairs().unwrap();
            for p in &ps {
                let want = capacity(cf, p.len(), 8);
                for e in 0..8u32 {
                    let got = tok.iter().zip(&exp).filter(|(t, &x)| x == e && p.contains(t)).count();
                    assert_eq!(got, want, "{pool:?} cf {cf}: expert {e} took {got} of a pool of {}", p.len());
                }
            }
            assert!(tok.iter().all(|&t| batch.real_mask()[t as usize]), "padding is never routed");
        }
    }
}

#[test]
fn expert_choice_record_replay_bitwise() {
    let c = qwen3(r#""num_experts": 8, "num_experts_per_tok": 2"#);
    let mut model = MoeCausalLm::random(&c, 9, DType::F32, &Device::Cpu).unwrap();
    model
        .set_routing(RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Sequence }, AttentionMode::Bidirectional, false)
        .unwrap();
    let (batch, _) = inputs(32);
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    for recompute in [true, false] {
        let rep = model.forward(&batch, &RoutingPlan::replay(&rec.routes, recompute).unwrap()).unwrap();
        let a: Vec<f32> = rec.logits.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = rep.logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(rep.routes[&0].pairs().unwrap(), rec.routes[&0].pairs().unwrap());
    }
}

/// Lexicographically smallest index set of size m maximising Σ v (the tie rule of select_row).
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
fn group_limited_selection_equals_brute_force_with_ties() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut rc = RouterConfig::softmax_top_k(16, 4, true);
    rc.n_group = 4;
    rc.topk_group = 2;
    for trial in 0..500 {
        // few distinct values → many ties; some negative (experts of dropped groups are masked to
        // −∞, so a negative score in a kept group still beats them)
        let v: Vec<f32> = (0..16).map(|_| rng.random_range(-2i32..6) as f32 * 0.25).collect();
        let group_scores: Vec<f32> = v.chunks(4).map(|g| brute_best(g, 2).iter().map(|&i| g[i]).sum()).collect();
        let groups = brute_best(&group_scores, 2);
        let masked: Vec<f32> = v.iter().enumerate().map(|(i, &s)| if groups.contains(&(i / 4)) { s } else { f32::NEG_INFINITY }).collect();
        let want = brute_best(&masked, 4);
        let mut got = select_row(&v, &rc);
        got.sort_unstable();
        assert_eq!(got, want, "trial {trial}: scores {v:?}");
    }
}

#[test]
fn metrics_equal_hand_computed_values() {
    let dev = Device::Cpu;
    let t = |v: Vec<u32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
    let f = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
    // 3 tokens (the last is padding), 4 experts, top-2
    let scores = Tensor::from_vec(
        vec![0.5f32, 0.3, 0.1, 0.1, 0.6, 0.1, 0.2, 0.1, 0.25, 0.25, 0.25, 0.25],
        (3, 4),
        &dev,
    )
    .unwrap();
    let route = LayerRoute {
        num_tokens: 3,
        top_k: Some(2),
        token_A: t(vec![0, 0, 1, 1, 2, 2]),
        expert_A: t(vec![0, 1, 0, 2, 3, 2]),
        prob_A: f(vec![0.5, 0.3, 0.6, 0.2, 0.25, 0.25]),
        weight_A: f(vec![0.625, 0.375, 0.75, 0.25, 0.5, 0.5]),
        scores_NE: scores.clone(),
        logits_NE: scores.clone(),
    };
    let real = [true, true, false];
    let h = layer_health(&route, &real, ScoreFunction::Softmax).unwrap();
    assert_eq!(h.tokens, 2);
    assert!((h.confidence - (0.8 + 0.8) / 2.0).abs() < 1e-6);
    assert_eq!(h.load, vec![2, 1, 1, 0]); // mean 1, max 2
    assert!((h.max_vio - 1.0).abs() < 1e-12);
    assert_eq!((h.dropped, h.mean_experts_per_token), (0.0, 2.0));
    // sigmoid: Σ selected / Σ all (rows of `scores` sum to 1.0 here, so the same numbers)
    let h = layer_health(&route, &real, ScoreFunction::Sigmoid).unwrap();
    assert!((h.confidence - 0.8).abs() < 1e-6);
    assert_eq!(max_vio(&[3, 1, 1, 1]), 1.0);
    assert_eq!(max_vio(&[0, 0]), 0.0);
    // expert choice: token 0 → 3 experts, token 1 → none
    let ec = LayerRoute {
        top_k: None,
        token_A: t(vec![0, 0, 0]),
        expert_A: t(vec![0, 1, 3]),
        prob_A: f(vec![0.5, 0.3, 0.1]),
        weight_A: f(vec![0.5, 0.3, 0.1]),
        ..route
    };
    let h = layer_health(&ec, &real, ScoreFunction::Softmax).unwrap();
    assert_eq!((h.dropped, h.mean_experts_per_token), (0.5, 1.5));
    assert!((h.confidence - 0.45).abs() < 1e-6);
}

#[test]
fn bad_router_configs_name_the_field() {
    let err = |extra: &str| {
        ModelConfig::from_json_str(&format!(r#"{{{BASE}, "architectures": ["Glm4MoeForCausalLM"], {extra}}}"#), "c.json")
            .unwrap_err()
            .to_string()
    };
    let e = err(r#""n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 3"#);
    assert!(e.contains("`n_group`") && e.contains("does not divide"), "{e}");
    let e = err(r#""n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 5"#);
    assert!(e.contains("`topk_group`"), "{e}");
    let e = err(r#""n_routed_experts": 16, "num_experts_per_tok": 4, "routing_strategy": "expert_choice", "capacity_factor": 0, "attention_mode": "bidirectional""#);
    assert!(e.contains("`capacity_factor`"), "{e}");
    let e = err(r#""n_routed_experts": 16, "num_experts_per_tok": 4, "routing_strategy": "expert_choice", "expert_choice_pool": "sequence""#);
    assert!(e.contains("`expert_choice_pool`") && e.contains("leaks the future"), "{e}");
    // the explicit override and a one-token pool are accepted on a causal model
    let ok = |extra: &str| ModelConfig::from_json_str(&format!(r#"{{{BASE}, "architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 16, "num_experts_per_tok": 4, {extra}}}"#), "c");
    assert!(ok(r#""routing_strategy": "expert_choice", "allow_causal_expert_choice": true"#).is_ok());
    assert!(ok(r#""routing_strategy": "expert_choice", "expert_choice_pool": "block:1""#).is_ok());
    let e = err(r#""n_routed_experts": 16, "num_experts_per_tok": 4, "routing_strategy": "expert_choice", "expert_choice_pool": "block:0""#);
    assert!(e.contains("`expert_choice_pool`"), "{e}");
    let e = err(r#""n_routed_experts": 16, "num_experts_per_tok": 4, "routing_strategy": "sideways""#);
    assert!(e.contains("`routing_strategy`"), "{e}");
}

#[test]
fn llada2_style_model_builds_runs_and_attends_bidirectionally() {
    let c = cfg(r#""architectures": ["LLaDA2MoeModelLM"], "num_experts": 16, "num_experts_per_tok": 4,
        "score_function": "sigmoid", "moe_router_enable_expert_bias": true, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "num_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": true"#);
    assert_eq!(c.moe_layers, vec![1]);
    assert_eq!(c.attention.mode, AttentionMode::Bidirectional);
    assert_eq!(c.moe.router.score_function, ScoreFunction::Sigmoid);
    let model = MoeCausalLm::random(&c, 3, DType::F32, &Device::Cpu).unwrap();
    let a = Batch::from_sequences(&[vec![1, 2, 3, 4, 5]], 0, &Device::Cpu).unwrap();
    let b = Batch::from_sequences(&[vec![1, 2, 3, 4, 9]], 0, &Device::Cpu).unwrap();
    let ra = model.forward(&a, &RoutingPlan::record()).unwrap();
    let rb = model.forward(&b, &RoutingPlan::compute()).unwrap();
    let first = |t: &Tensor| t.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(first(&ra.logits), first(&rb.logits), "position 0 must see the last token");
    let rep = model.forward(&a, &RoutingPlan::replay(&ra.routes, true).unwrap()).unwrap();
    assert_eq!(ra.logits.to_vec3::<f32>().unwrap(), rep.logits.to_vec3::<f32>().unwrap());
}
