//! The routing stage on CUDA against its host definition (`moe::router::select`): top-k (plain,
//! biased, group-limited, with ties), expert choice (pools up to thousands of tokens, ties),
//! the device checks of forced routes, and whole-model routing / replay on the GPU.
//!
//! (In the cli crate so that it builds with the binary's exact features: no second CUDA kernel build.)
//! Needs the `cuda` feature and a GPU: built by `scripts/cuda/build.sh` and run on the GPU
//! machine by `scripts/cuda/gpu_check.sh`. Without the feature this file compiles to nothing.
#![cfg(feature = "cuda")]
#![allow(non_snake_case)]

use candle_core::{DType, Device, Tensor};
use lockstep_model::moe::router::expert_choice::capacity;
use lockstep_model::moe::router::select::{ExpertChoice, TopK};
use lockstep_model::routing::{Replay, ReplayWeights, RouteMode, RoutingPlan, ROUTE_FREE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test runs on the GPU machine)")
}

/// Random scores; with `levels` > 0 rounded to that many values so that ties are common.
fn scores(n: usize, e: usize, levels: u32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * e)
        .map(|_| {
            let x: f32 = rng.random_range(-2.0..2.0);
            if levels > 0 { (x * levels as f32).round() / levels as f32 } else { x }
        })
        .collect()
}

#[test]
fn top_k_matches_host_with_ties_and_groups() {
    let dev = gpu();
    // (N, E, groups, topk_group, K)
    let cases = [(1000, 64, 1, 1, 8), (777, 128, 8, 4, 8), (513, 256, 8, 3, 8), (300, 160, 1, 1, 6), (64, 1024, 16, 4, 16), (5, 8, 4, 2, 2)];
    for (i, &(n, e, g, kg, k)) in cases.iter().enumerate() {
        for levels in [0, 4] {
            let v = scores(n, e, levels, 10 + i as u64);
            let cpu = Tensor::from_vec(v.clone(), (n, e), &Device::Cpu).unwrap();
            let op = TopK { n_group: g, topk_group: kg, k };
            let want: Vec<u32> = op.apply(&cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<u32> = op.apply(&cpu.to_device(&dev).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "N {n} E {e} groups {g}/{kg} K {k} levels {levels}");
        }
    }
}

#[test]
fn expert_choice_matches_host() {
    let dev = gpu();
    let (n, e) = (3000, 32);
    for (levels, pool_sizes) in [(0u32, vec![3000]), (3, vec![1, 255, 256, 257, 1000, 1231]), (0, vec![7; 428])] {
        let mut pools = Vec::new();
        let mut next = 0u32;
        for &p in &pool_sizes {
            pools.push((next..next + p as u32).collect::<Vec<u32>>());
            next += p as u32;
        }
        let caps: Vec<usize> = pools.iter().map(|p| capacity(1.25, p.len(), e)).collect();
        let v = scores(n, e, levels, 99);
        let cpu = Tensor::from_vec(v, (n, e), &Device::Cpu).unwrap();
        let op = ExpertChoice { pools, caps };
        let want: Vec<u32> = op.apply(&cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<u32> = op.apply(&cpu.to_device(&dev).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(!want.is_empty());
        assert_eq!(got, want, "pools {:?} levels {levels}", &pool_sizes[..pool_sizes.len().min(6)]);
    }
}

fn tiny_model(dev: &Device, sigmoid: bool) -> lockstep_model::MoeCausalLm {
    let mut cfg = lockstep_model::init::default_config();
    if sigmoid {
        cfg.moe.router.score_function = lockstep_model::config::ScoreFunction::Sigmoid;
        cfg.moe.router.expert_bias = true;
        cfg.moe.router.n_group = 4;
        cfg.moe.router.topk_group = 2;
        cfg.moe.router.routed_scaling_factor = 2.5;
    }
    lockstep_model::MoeCausalLm::random(&cfg, 7, DType::F32, dev).unwrap()
}

fn batch(dev: &Device) -> lockstep_model::Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let seqs: Vec<Vec<u32>> = (0..4).map(|r| (0..40 + 9 * r).map(|_| rng.random_range(0..200)).collect()).collect();
    lockstep_model::Batch::from_sequences(&seqs, 0, dev).unwrap()
}

#[test]
fn model_routes_on_gpu_equal_cpu_and_replay_is_bitwise() {
    for sigmoid in [false, true] {
        let (cpu_m, gpu_m) = (tiny_model(&Device::Cpu, sigmoid), tiny_model(&gpu(), sigmoid));
        let rec_cpu = cpu_m.forward(&batch(&Device::Cpu), &RoutingPlan::record()).unwrap();
        let b = batch(&gpu());
        let rec = gpu_m.forward(&b, &RoutingPlan::record()).unwrap();
        for (l, r) in &rec.routes {
            let want: Vec<u32> = rec_cpu.routes[l].expert_A.to_vec1().unwrap();
            let got: Vec<u32> = r.expert_A.to_vec1().unwrap();
            let same = want.iter().zip(&got).filter(|(a, b)| a == b).count();
            // f32 GEMMs on the two devices round differently: near-ties may flip, nothing more
            assert!(same * 1000 >= 999 * want.len(), "layer {l}: {same}/{} ids agree (sigmoid {sigmoid})", want.len());
        }
        for recompute in [true, false] {
            let rep = gpu_m.forward(&b, &RoutingPlan::replay(&rec.routes, recompute).unwrap()).unwrap();
            let d = lockstep_model::parity::max_abs_diff(&rep.logits, &rec.logits).unwrap();
            assert_eq!(d, 0.0, "record → replay on the GPU (sigmoid {sigmoid}, recompute {recompute})");
        }
    }
}

#[test]
fn free_rows_and_faulty_routes_on_gpu() {
    let dev = gpu();
    let m = tiny_model(&dev, false);
    let b = batch(&dev);
    let rec = m.forward(&b, &RoutingPlan::record()).unwrap();
    let (&layer, route) = rec.routes.iter().next().unwrap();
    let ids = route.ids_NK().unwrap();
    let (n, k) = ids.dims2().unwrap();
    // every other row free: the router's own choice there, so the result equals the recording
    let mut host: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    for row in host.chunks_mut(k).step_by(2) {
        row.fill(ROUTE_FREE);
    }
    let forced = Tensor::from_vec(host.clone(), (n, k), &dev).unwrap();
    let plan = RoutingPlan::compute().with_layer(layer, RouteMode::Replay(Replay::top_k(forced, ReplayWeights::Recompute)));
    let out = m.forward(&b, &plan).unwrap();
    assert_eq!(lockstep_model::parity::max_abs_diff(&out.logits, &rec.logits).unwrap(), 0.0);
    // faults are found on the device and named by the host re-check
    let e = m.cfg.moe.router.num_experts as u32;
    for (what, edit) in [("mixes ROUTE_FREE", 0usize), (">= num_experts", 1), ("selected twice", 2)] {
        // row 1 is forced (even rows are free)
        let mut bad = host.clone();
        match edit {
            0 => bad[k] = ROUTE_FREE,
            1 => bad[k + 1] = e + 3,
            _ => bad[k + 1] = bad[k],
        }
        let forced = Tensor::from_vec(bad, (n, k), &dev).unwrap();
        let plan = RoutingPlan::compute().with_layer(layer, RouteMode::Replay(Replay::top_k(forced, ReplayWeights::Recompute)));
        let err = m.forward(&b, &plan).err().expect("a faulty route is refused").to_string();
        assert!(err.contains(what), "{err}");
    }
}
