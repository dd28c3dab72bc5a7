//! The crate's edges: names parsed through `FromStr` (errors list the accepted values), the
//! presets, checked accessors and routes that refuse bad input with errors naming the layer,
//! and the synthetic experts layer of the benchmarks.
#![allow(non_snake_case)]

use candle_core::{DType, Device, Tensor};
use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
use lockstep_model::init::{default_config, Preset};
use lockstep_model::moe::experts::Experts;
use lockstep_model::moe::synthetic::{LayerShape, SyntheticLayer};
use lockstep_model::{parse_dtype, Batch, DeviceSpec, MoeCausalLm, Replay, RoutingPlan};

#[test]
fn names_parse_and_errors_list_the_accepted_values() {
    assert_eq!("block:4".parse::<Pool>().unwrap(), Pool::Block(4));
    assert_eq!("sequence".parse::<Pool>().unwrap(), Pool::Sequence);
    assert_eq!("batch".parse::<Pool>().unwrap(), Pool::Batch);
    assert_eq!("causal".parse::<AttentionMode>().unwrap(), AttentionMode::Causal);
    assert_eq!("block:8".parse::<AttentionMode>().unwrap(), AttentionMode::Block(8));
    assert_eq!("token-choice".parse::<RoutingStrategy>().unwrap(), RoutingStrategy::TokenChoice);
    assert_eq!(
        "expert-choice".parse::<RoutingStrategy>().unwrap(),
        RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Sequence }
    );
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
    assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
    assert_eq!(parse_dtype("f32").unwrap(), DType::F32);
    assert_eq!("wide".parse::<Preset>().unwrap(), Preset::Wide);
    assert_eq!("small".parse::<LayerShape>().unwrap(), LayerShape::SMALL);

    let errs = [
        ("block:0".parse::<Pool>().unwrap_err().to_string(), "`block:0`: expected block:N (N > 0), sequence or batch"),
        ("full".parse::<AttentionMode>().unwrap_err().to_string(), "`full`: expected causal, bidirectional or block:N (N > 0)"),
        ("token_choice".parse::<RoutingStrategy>().unwrap_err().to_string(), "`token_choice`: expected token-choice or expert-choice"),
        ("cuda:x".parse::<DeviceSpec>().unwrap_err().to_string(), "`cuda:x`: expected cpu, cuda or cuda:N (N a GPU ordinal)"),
        (parse_dtype("f16").unwrap_err().to_string(), "`f16`: expected f32 or bf16"),
        ("huge".parse::<Preset>().unwrap_err().to_string(), "`huge`: expected default or wide"),
        ("c".parse::<LayerShape>().unwrap_err().to_string(), "`c`: expected a, b or small"),
    ];
    for (got, want) in errs {
        assert_eq!(got, want);
    }
    // config.json fields keep their messages
    let mut cfg: serde_json::Value = serde_json::from_str(lockstep_model::init::DEFAULT_CONFIG_JSON).unwrap();
    cfg["routing_strategy"] = "expert_choice".into();
    cfg["expert_choice_pool"] = "block:0".into();
    let e = lockstep_model::ModelConfig::from_json_str(&cfg.to_string(), "c.json").unwrap_err().to_string();
    assert_eq!(e, "config c.json: field `expert_choice_pool`: `block:0`: expected block:N (N > 0), sequence or batch");
}

#[test]
fn devices_open_by_name() {
    assert!(matches!(DeviceSpec::Cpu.open().unwrap(), Device::Cpu));
    assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    #[cfg(not(feature = "cuda"))]
    {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.starts_with("cuda:0: CUDA unavailable"), "{e}");
    }
}

#[test]
fn presets_are_named_configs() {
    assert_eq!(Preset::Default.config().unwrap(), default_config());
    let wide = Preset::Wide.config().unwrap();
    assert_eq!((wide.hidden_size, wide.moe.expert_intermediate_size, wide.moe_layers.clone()), (1024, 768, vec![0, 1]));
    assert_eq!((wide.moe.router.num_experts, wide.moe.router.top_k, wide.vocab_size), (8, 2, 512));
    let layer = Preset::MoeLayer { hidden: 64, ffn: 32, experts: 8, top_k: 2 }.config().unwrap();
    assert_eq!((layer.num_layers, layer.moe_layers.clone(), layer.hidden_size, layer.dense_intermediate_size), (1, vec![0], 64, 256));
    assert_eq!((layer.moe.expert_intermediate_size, layer.moe.router.num_experts, layer.moe.router.top_k), (32, 8, 2));
    assert!(layer.moe.router.norm_topk_prob);
    let e = Preset::MoeLayer { hidden: 64, ffn: 32, experts: 4, top_k: 8 }.config().unwrap_err().to_string();
    assert!(e.contains("num_experts_per_tok"), "{e}");
    // the model of a preset is `random` of its config
    let a = Preset::Default.model(3, DType::F32, &Device::Cpu).unwrap();
    let b = MoeCausalLm::embedded_default(3, DType::F32, &Device::Cpu).unwrap();
    let diff = (a.embed_tokens.embeddings() - b.embed_tokens.embeddings()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn moe_blocks_are_checked_by_layer() {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    assert!(m.moe_block_checked(1).is_ok() && m.moe_block_checked_mut(3).is_ok());
    let e = m.moe_block_checked(2).unwrap_err().to_string();
    assert_eq!(e, "layer 2: not an MoE layer: layer 2 is dense; MoE layers are [0, 1, 3]");
    let e = m.moe_block_checked_mut(7).unwrap_err().to_string();
    assert_eq!(e, "layer 7: not an MoE layer: the model has 4 layers");
}

#[test]
fn replaying_a_malformed_route_is_an_error_naming_the_layer() {
    let m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let b = Batch::from_sequences(&[vec![1, 2, 3, 4]], 0, &Device::Cpu).unwrap();
    let mut rec = m.forward(&b, &RoutingPlan::record()).unwrap().routes;
    assert!(Replay::of(&rec[&1], false).is_ok());
    // a top-k route that lost an expert id
    let r = rec.get_mut(&1).unwrap();
    r.expert_A = r.expert_A.narrow(0, 0, 7).unwrap();
    let e = Replay::of(&rec[&1], true).unwrap_err().to_string();
    assert!(e.contains("4 tokens x 2 experts holds 7 experts"), "{e}");
    let e = RoutingPlan::replay(&rec, true).unwrap_err().to_string();
    assert!(e.starts_with("routing plan, layer 1: recorded route:"), "{e}");
    // given weights that are not one per assignment
    let r = rec.get_mut(&3).unwrap();
    r.weight_A = r.weight_A.narrow(0, 0, 3).unwrap();
    let e = Replay::of(&rec[&3], false).unwrap_err().to_string();
    assert!(e.contains("3 weights for 8 assignments"), "{e}");
    assert!(Replay::of(&rec[&3], true).is_ok(), "recomputed weights ignore the recorded ones");
}

/// The benchmark layer routes like a softmax top-k router (renormalised, selection order) and
/// its reference is the CPU experts stage; the seeded backward gives the reference's gradients.
#[test]
fn synthetic_layer_routes_and_its_reference_is_the_cpu_stage() {
    let dev = Device::Cpu;
    let s = LayerShape::SMALL;
    let t = 24;
    let l = SyntheticLayer::new(s, t, DType::F32, &dev).unwrap();
    let (tok, exp): (Vec<u32>, Vec<u32>) = (l.token_A.to_vec1().unwrap(), l.expert_A.to_vec1().unwrap());
    let w: Vec<f32> = l.w_A.as_tensor().to_vec1().unwrap();
    assert_eq!(tok, (0..(t * s.k) as u32).map(|a| a / s.k as u32).collect::<Vec<_>>());
    for n in 0..t {
        let (ids, ws) = (&exp[n * s.k..(n + 1) * s.k], &w[n * s.k..(n + 1) * s.k]);
        assert!(ids.iter().all(|&e| (e as usize) < s.e) && ids[0] != ids[1], "{ids:?}");
        assert!(ws[0] >= ws[1] && ws[1] > 0.0 && (ws.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{ws:?}");
    }
    let (out, ref_grads) = l.reference().unwrap();
    let experts = Experts::from_stacked(l.gate_up.as_tensor().clone(), l.down.as_tensor().clone()).unwrap();
    let local = lockstep_model::moe::parallel::local_experts(l.x.as_tensor(), &l.token_A, &l.expert_A, l.w_A.as_tensor(), &experts).unwrap();
    let d = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d(&out, &local), 0.0);
    let grads = l.grads(&local).unwrap();
    assert_eq!(grads.len(), 4);
    for (g, r) in grads.iter().zip(&ref_grads) {
        assert_eq!(g.dims(), r.dims());
        assert_eq!(d(g, r), 0.0);
    }
}
