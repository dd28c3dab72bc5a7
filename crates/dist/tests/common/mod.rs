//! The harness of the "W ranks equal one rank" checks, shared by the CPU test
//! (`crates/dist/tests/ep_equals_single.rs`) and the GPU test (`crates/cli/tests/gpu_ep.rs`):
//! expert parallelism + data parallelism over W thread ranks (`local_group`) against one rank
//! on the whole batch, on any device — logits, routes, every gradient (replicated ones after
//! the all-reduce, expert ones on their owner), bitwise replay, routing health reduced over
//! the ranks. Panics on a mismatch (test code).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lockstep_dist::{all_reduce_grads, shard_experts, Collective};
use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 4;
const T: usize = 24;

fn global_rows() -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    (0..ROWS).map(|_| (0..T).map(|_| rng.random_range(1..256)).collect()).collect()
}

/// A fixed random cotangent for the logits, so loss = Σ logits · R.
fn cotangent(rows: usize, v: usize) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let data: Vec<f32> = (0..rows * T * v).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, (rows, T, v), &Device::Cpu).unwrap()
}

fn model(expert_choice: bool, dev: &Device) -> MoeCausalLm {
    let mut m = MoeCausalLm::embedded_default(3, DType::F32, dev).unwrap();
    if expert_choice {
        let s = RoutingStrategy::ExpertChoice { capacity_factor: 1.5, pool: Pool::Sequence };
        m.set_routing(s, AttentionMode::Bidirectional, false).unwrap();
    }
    m
}

struct RankResult {
    logits: Tensor,
    /// layer → host (token slot, expert) pairs, sorted
    routes: HashMap<usize, Vec<(u32, u32)>>,
    grads: HashMap<String, Tensor>,
    replay_diff: f64,
    /// layer → routing health of the global batch (reduced over the ranks)
    health: HashMap<usize, lockstep_model::metrics::LayerHealth>,
}

fn pairs(r: &lockstep_model::LayerRoute, slot_offset: u32) -> Vec<(u32, u32)> {
    let (t, e) = r.pairs().unwrap();
    let mut v: Vec<(u32, u32)> = t.iter().zip(&e).map(|(&t, &e)| (t + slot_offset, e)).collect();
    v.sort_unstable();
    v
}

/// Forward (recorded), loss, backward and gradient all-reduce on the rows of `rank`.
fn run_rank(mut m: MoeCausalLm, comm: Option<Arc<dyn Collective>>, rows: &[Vec<u32>], first_row: usize) -> RankResult {
    let dev = m.device().clone();
    if let Some(c) = &comm {
        shard_experts(&mut m, c.clone()).unwrap();
    }
    let mut params: Vec<(String, Var)> = Vec::new();
    m.map_params(|name, t| {
        let v = Var::from_tensor(t)?;
        params.push((name.to_string(), v.clone()));
        Ok(v.as_tensor().clone())
    })
    .unwrap();
    let batch = Batch::padded(rows, &vec![vec![1u8; T]; rows.len()], &dev).unwrap();
    let out = m.forward(&batch, &RoutingPlan::record()).unwrap();
    let v = out.logits.dim(2).unwrap();
    let r = cotangent(ROWS, v).narrow(0, first_row, rows.len()).unwrap().to_device(&dev).unwrap();
    let loss = (&out.logits * r).unwrap().sum_all().unwrap();
    let mut grads = loss.backward().unwrap();
    if let Some(c) = &comm {
        all_reduce_grads(c.as_ref(), &params, &mut grads).unwrap();
    }
    let grads = params.iter().filter_map(|(n, var)| grads.get(var.as_tensor()).map(|g| (n.clone(), g.clone()))).collect();
    let replay = m.forward(&batch, &RoutingPlan::replay(&out.routes, true)).unwrap();
    let replay_diff = lockstep_model::parity::max_abs_diff(&replay.logits, &out.logits).unwrap();
    let routes = out.routes.iter().map(|(&l, r)| (l, pairs(r, (first_row * T) as u32))).collect();
    let score = m.cfg.moe.router.score_function;
    let health = out
        .routes
        .iter()
        .map(|(&l, r)| {
            let local = lockstep_model::metrics::layer_health(r, &vec![true; rows.len() * T], score).unwrap();
            let h = match &comm {
                Some(c) => lockstep_dist::metrics::reduce_health(c.as_ref(), &local).unwrap().health,
                None => local,
            };
            (l, h)
        })
        .collect();
    RankResult { logits: out.logits.detach(), routes, grads, replay_diff, health }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    let d = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
    d / s.max(1e-30)
}

pub fn check(world: usize, expert_choice: bool, dev: &Device) {
    let rows = global_rows();
    let single = run_rank(model(expert_choice, dev), None, &rows, 0);
    assert_eq!(single.replay_diff, 0.0);
    let per = ROWS / world;
    let results: Vec<RankResult> = std::thread::scope(|s| {
        let handles: Vec<_> = lockstep_dist::local_group(world)
            .into_iter()
            .map(|c| {
                let rows = &rows;
                s.spawn(move || {
                    let r = c.rank();
                    let comm: Arc<dyn Collective> = Arc::new(c);
                    run_rank(model(expert_choice, dev), Some(comm), &rows[r * per..(r + 1) * per], r * per)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let e = single.grads["model.layers.0.mlp.experts.gate_up_proj"].dim(0).unwrap();
    let l = e / world; // (shard size)
    for (r, res) in results.iter().enumerate() {
        let tag = format!("{dev:?} world {world} rank {r} expert_choice {expert_choice}");
        assert_eq!(res.replay_diff, 0.0, "{tag}: record → replay must be bitwise");
        let want = single.logits.narrow(0, r * per, per).unwrap();
        assert!(rel(&res.logits, &want) < 1e-5, "{tag}: logits rel {:.3e}", rel(&res.logits, &want));
        for (layer, got) in &res.routes {
            let want: Vec<(u32, u32)> =
                single.routes[layer].iter().copied().filter(|&(t, _)| (t as usize) / T / per == r).collect();
            assert_eq!(got, &want, "{tag}: layer {layer} routes");
        }
        for (layer, h) in &res.health {
            let want = &single.health[layer];
            assert_eq!((h.tokens, &h.load), (want.tokens, &want.load), "{tag}: layer {layer} tokens per expert");
            assert_eq!(h.max_vio, want.max_vio, "{tag}: layer {layer} max_vio");
            assert!((h.confidence - want.confidence).abs() < 1e-6, "{tag}: layer {layer} confidence {} vs {}", h.confidence, want.confidence);
            assert!((h.mean_experts_per_token - want.mean_experts_per_token).abs() < 1e-12, "{tag}: experts per token");
        }
        for (name, g_single) in &single.grads {
            let got = res.grads.get(name).unwrap_or_else(|| panic!("{tag}: no gradient for {name}"));
            let want = if lockstep_dist::dp::is_expert_param(name) { g_single.narrow(0, r * l, l).unwrap() } else { g_single.clone() };
            let err = rel(got, &want);
            assert!(err < 1e-4, "{tag}: gradient of {name} rel {err:.3e}");
        }
    }
    // the replicated gradients are identical on every rank after the all-reduce
    for name in single.grads.keys().filter(|n| !lockstep_dist::dp::is_expert_param(n)) {
        let g0 = &results[0].grads[name];
        for res in &results[1..] {
            assert_eq!(lockstep_model::parity::max_abs_diff(&res.grads[name], g0).unwrap(), 0.0, "{name} differs across ranks");
        }
    }
}

