//! Record → replay round trips: replaying a recording reproduces the recorded logits bit for
//! bit, for both architectures and for models with dense layers between MoE layers; free rows
//! (ROUTE_FREE) route as the model would; forcing other experts changes the output.

mod common;

use candle_core::{DType, Device, Tensor};
use lockstep_model::{Batch, MoeCausalLm, Replay, ReplayWeights, RouteMode, RoutingPlan, ROUTE_FREE};

fn batch(vocab: u32) -> Batch {
    // mixed lengths → right padding in the last rows
    let seqs: Vec<Vec<u32>> = (0..3u32).map(|s| (0..(9 + 4 * s)).map(|i| (i * 7 + s * 13 + 1) % vocab).collect()).collect();
    Batch::from_sequences(&seqs, 0, &Device::Cpu).unwrap()
}

fn assert_bitwise(a: &Tensor, b: &Tensor) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let differing = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{differing} logits differ bitwise");
}

fn round_trip(model: &MoeCausalLm) {
    let b = batch(model.cfg.vocab_size as u32);
    let rec = model.forward(&b, &RoutingPlan::record()).unwrap();
    assert_eq!(rec.routes.keys().copied().collect::<Vec<_>>(), model.cfg.moe_layers, "one record per MoE layer, dense layers absent");
    for recompute in [true, false] {
        let rep = model.forward(&b, &RoutingPlan::replay(&rec.routes, recompute).unwrap()).unwrap();
        assert_bitwise(&rec.logits, &rep.logits);
        for (l, r) in &rep.routes {
            assert_bitwise(&r.weights_NK().unwrap(), &rec.routes[l].weights_NK().unwrap());
        }
    }
    let plain = model.forward(&b, &RoutingPlan::compute()).unwrap();
    assert!(plain.routes.is_empty());
    assert_bitwise(&rec.logits, &plain.logits);
}

#[test]
fn record_replay_bitwise_qwen3() {
    round_trip(&MoeCausalLm::load(&common::fixture("qwen3_moe_tiny"), DType::F32, &Device::Cpu).unwrap());
}

#[test]
fn record_replay_bitwise_qwen2_shared_expert() {
    round_trip(&MoeCausalLm::load(&common::fixture("qwen2_moe_tiny"), DType::F32, &Device::Cpu).unwrap());
}

#[test]
fn record_replay_bitwise_with_dense_layers_between() {
    let default = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(default.cfg.moe_layers, vec![0, 1, 3]);
    round_trip(&default);
    let gaps = MoeCausalLm::load(&common::extra_fixture("qwen3_moe_dense_gaps"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(gaps.cfg.moe_layers, vec![0, 2, 4]);
    round_trip(&gaps);
}

#[test]
fn free_rows_route_like_compute_and_forced_rows_change_output() {
    let model = MoeCausalLm::embedded_default(3, DType::F32, &Device::Cpu).unwrap();
    let b = batch(256);
    let rec = model.forward(&b, &RoutingPlan::record()).unwrap();
    let (n, k) = rec.routes[&0].ids_NK().unwrap().dims2().unwrap();

    // all rows free → identical to compute
    let free = Tensor::from_vec(vec![ROUTE_FREE; n * k], (n, k), &Device::Cpu).unwrap();
    let mut plan = RoutingPlan::compute();
    for &l in &model.cfg.moe_layers {
        plan = plan.with_layer(l, RouteMode::Replay(Replay::top_k(free.clone(), ReplayWeights::Recompute)));
    }
    let out = model.forward(&b, &plan).unwrap();
    assert_bitwise(&rec.logits, &out.logits);

    // force experts that the router did not pick on layer 0 → logits change; the replayed ids are
    // exactly the forced ones; free rows keep the router's choice
    let ids: Vec<u32> = rec.routes[&0].ids_NK().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let e = model.cfg.moe.router.num_experts as u32;
    let mut forced = Vec::with_capacity(n * k);
    for (row_i, row) in ids.chunks(k).enumerate() {
        if row_i % 2 == 1 {
            forced.extend(std::iter::repeat_n(ROUTE_FREE, k));
            continue;
        }
        let mut other: Vec<u32> = (0..e).filter(|x| !row.contains(x)).take(k).collect();
        other.reverse();
        forced.extend(other);
    }
    let forced_t = Tensor::from_vec(forced.clone(), (n, k), &Device::Cpu).unwrap();
    let plan = RoutingPlan::compute().with_layer(0, RouteMode::Replay(Replay::top_k(forced_t, ReplayWeights::Recompute)));
    let out = model.forward(&b, &plan).unwrap();
    let used: Vec<u32> = out.routes[&0].ids_NK().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (i, (&u, &f)) in used.iter().zip(&forced).enumerate() {
        let expect = if f == ROUTE_FREE { ids[i] } else { f };
        assert_eq!(u, expect, "slot {i}");
    }
    let diff = (&out.logits - &rec.logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 1e-3, "forcing other experts must change logits (max diff {diff})");
}

#[test]
fn replay_recompute_carries_router_gradient_given_does_not() {
    use candle_core::Var;
    let mut model = MoeCausalLm::embedded_default(1, DType::F32, &Device::Cpu).unwrap();
    let w = model.moe_block_mut(0).unwrap().router.gate.weight().clone();
    let var = Var::from_tensor(&w).unwrap();
    let gate = model.moe_block_mut(0).unwrap().router.gate.with_params(var.as_tensor().clone(), None);
    model.moe_block_mut(0).unwrap().router.gate = gate;
    let b = batch(256);
    let rec = model.forward(&b, &RoutingPlan::record()).unwrap();
    let grad_norm = |recompute: bool| {
        let out = model.forward(&b, &RoutingPlan::replay(&rec.routes, recompute).unwrap()).unwrap();
        let loss = out.logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        grads.get(var.as_tensor()).map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).unwrap_or(0.0)
    };
    assert!(grad_norm(true) > 0.0, "recomputed replay weights must reach the router");
    assert_eq!(grad_norm(false), 0.0, "given weights are constants: no router gradient");
}
