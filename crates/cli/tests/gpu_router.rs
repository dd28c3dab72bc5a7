//! The token-choice router's fused ops (`lockstep_model::moe::router::fused`, kernels in
//! `crates/model/src/gpu/route.cu`) on CUDA:
//!
//! - the softmax and the top-k weights on the GPU against the same ops on the CPU (within 1e-6
//!   relative; the gathered probs bit for bit);
//! - batch invariance: a row's bits alone equal its bits inside 4096 rows;
//! - the backward of both against candle's autograd through the composed ops on the GPU;
//! - the token map a / K filled on the device.
//!
//! (In the cli crate so that it builds with the binary's exact features.) Needs the `cuda`
//! feature and a GPU; without the feature this file compiles to nothing.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use lockstep_model::config::{RouterConfig, ScoreFunction};
use lockstep_model::moe::router::fused::{self, Renorm, WeightRule};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test runs on the GPU machine)")
}

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// max over elements of |a − b| / max(|b|, tiny), on the host
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-30)).fold(0f32, f32::max)
}

/// max |a − b| / max |b| (gradients), on the host
fn max_rel_norm(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-30)
}

/// [N, K] u32: K distinct experts per row
fn random_ids(n: usize, e: usize, k: usize, seed: u64, dev: &Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut row: Vec<u32> = (0..e as u32).collect();
        row.shuffle(&mut rng);
        ids.extend_from_slice(&row[..k]);
    }
    Tensor::from_vec(ids, (n, k), dev).unwrap()
}

fn rules() -> Vec<(String, ScoreFunction, WeightRule)> {
    let mut out = Vec::new();
    for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        for norm in [true, false] {
            for scale in [1.0, 2.5] {
                let mut cfg = RouterConfig::softmax_top_k(8, 2, norm);
                cfg.score_function = score;
                cfg.routed_scaling_factor = scale;
                out.push((format!("{score:?} norm={norm} scale={scale}"), score, WeightRule::of(&cfg)));
            }
        }
    }
    out
}

fn scores_of(score: ScoreFunction, logits: &Tensor) -> Tensor {
    match score {
        ScoreFunction::Softmax => fused::softmax(logits).unwrap(),
        ScoreFunction::Sigmoid => candle_nn::ops::sigmoid(logits).unwrap(),
    }
}

fn composed_weights(scores: &Tensor, ids: &Tensor, r: WeightRule) -> (Tensor, Tensor) {
    let p = scores.gather(ids, 1).unwrap();
    let w = match r.renorm {
        Renorm::None => p.clone(),
        Renorm::Sum => p.broadcast_div(&p.sum_keepdim(1).unwrap()).unwrap(),
        Renorm::SumEps(eps) => p.broadcast_div(&(p.sum_keepdim(1).unwrap() + f64::from(eps)).unwrap()).unwrap(),
    };
    let w = if r.scale == 1.0 { w } else { (w * r.scale).unwrap() };
    (p, w)
}

#[test]
fn softmax_gpu_matches_cpu() {
    let dev = gpu();
    for (i, &e) in [1usize, 7, 32, 33, 64, 128, 160, 257, 1000].iter().enumerate() {
        for scale in [1.0f64, 30.0] {
            let x = (randn(&[37, e], 20 + i as u64, &Device::Cpu) * scale).unwrap();
            let want = fused::softmax(&x).unwrap();
            let got = fused::softmax(&x.to_device(&dev).unwrap()).unwrap();
            let r = max_rel(&got, &want);
            assert!(r <= 1e-6, "E = {e}, logits x{scale}: GPU vs CPU max relative error {r}");
            let r = max_rel(&got, &candle_nn::ops::softmax(&x, D::Minus1).unwrap());
            assert!(r <= 1e-6, "E = {e}: GPU vs candle's softmax {r}");
        }
    }
    assert_eq!(fused::softmax(&Tensor::zeros((0, 8), DType::F32, &dev).unwrap()).unwrap().dims(), [0, 8]);
}

#[test]
fn weights_gpu_match_cpu() {
    let dev = gpu();
    let (n, e) = (301usize, 64usize);
    for (name, score, r) in rules() {
        let scores = scores_of(score, &(randn(&[n, e], 1, &Device::Cpu) * 3.0).unwrap());
        for k in [1usize, 2, 8, e] {
            let ids = random_ids(n, e, k, 2 + k as u64, &Device::Cpu);
            let (p, w) = fused::topk_weights(&scores, &ids, r).unwrap();
            let (pg, wg) = fused::topk_weights(&scores.to_device(&dev).unwrap(), &ids.to_device(&dev).unwrap(), r).unwrap();
            assert_eq!(bits(&pg), bits(&p), "{name} K = {k}: probs are the gathered scores");
            let rel = max_rel(&wg, &w);
            assert!(rel <= 1e-6, "{name} K = {k}: GPU vs CPU weights {rel}");
        }
    }
    let z = fused::topk_weights(&Tensor::zeros((0, 8), DType::F32, &dev).unwrap(), &Tensor::zeros((0, 2), DType::U32, &dev).unwrap(), rules()[0].2).unwrap();
    assert_eq!(z.0.dims(), [0, 2]);
}

/// A row alone gives the bits it gets among 4096 rows (softmax, probs and weights).
#[test]
fn rows_are_batch_invariant() {
    let dev = gpu();
    let (n, k) = (4096usize, 8usize);
    for e in [60usize, 128, 256] {
        let x = (randn(&[n, e], e as u64, &dev) * 4.0).unwrap();
        let ids = random_ids(n, e, k, 1 + e as u64, &dev);
        let r = rules()[1].2; // softmax, renormalised, scaled
        let s = fused::softmax(&x).unwrap();
        let (p, w) = fused::topk_weights(&s, &ids, r).unwrap();
        for row in [0usize, 1, 2047, 4095] {
            let s1 = fused::softmax(&x.narrow(0, row, 1).unwrap()).unwrap();
            assert_eq!(bits(&s1), bits(&s.narrow(0, row, 1).unwrap()), "E = {e}: softmax row {row}");
            let (p1, w1) = fused::topk_weights(&s1, &ids.narrow(0, row, 1).unwrap(), r).unwrap();
            assert_eq!(bits(&p1), bits(&p.narrow(0, row, 1).unwrap()), "E = {e}: probs row {row}");
            assert_eq!(bits(&w1), bits(&w.narrow(0, row, 1).unwrap()), "E = {e}: weights row {row}");
        }
    }
}

/// Gradients to the logits through the fused ops vs candle's autograd through the composed
/// ops, on the GPU, for random upstream gradients of the scores, the probs and the weights.
#[test]
fn backward_matches_composed_on_gpu() {
    let dev = gpu();
    let (n, e) = (67usize, 48usize);
    for (name, score, r) in rules() {
        for k in [1usize, 4, e] {
            let seed = 300 + k as u64;
            let logits = Var::from_tensor(&(randn(&[n, e], seed, &dev) * 2.0).unwrap()).unwrap();
            let ids = random_ids(n, e, k, seed + 1, &dev);
            let (gs, gp, gw) = (randn(&[n, e], seed + 2, &dev), randn(&[n, k], seed + 3, &dev), randn(&[n, k], seed + 4, &dev));
            let grad = |s: &Tensor, p: &Tensor, w: &Tensor| -> Tensor {
                let a = (s * &gs).unwrap().sum_all().unwrap();
                let b = (p * &gp).unwrap().sum_all().unwrap();
                let c = (w * &gw).unwrap().sum_all().unwrap();
                ((a + b).unwrap() + c).unwrap().backward().unwrap().get(logits.as_tensor()).unwrap().clone()
            };
            let s = scores_of(score, logits.as_tensor());
            let (p, w) = fused::topk_weights(&s, &ids, r).unwrap();
            let g_fused = grad(&s, &p, &w);
            let s = match score {
                ScoreFunction::Softmax => candle_nn::ops::softmax(logits.as_tensor(), D::Minus1).unwrap(),
                ScoreFunction::Sigmoid => candle_nn::ops::sigmoid(logits.as_tensor()).unwrap(),
            };
            let (p, w) = composed_weights(&s, &ids, r);
            let g_comp = grad(&s, &p, &w);
            let rel = max_rel_norm(&g_fused, &g_comp);
            assert!(rel <= 1e-5, "{name} K = {k}: logits gradient on the GPU, max relative error {rel}");
        }
    }
}

#[test]
fn token_map_on_the_device() {
    let dev = gpu();
    for (n, k) in [(4096usize, 8usize), (3, 1), (1, 16), (0, 4)] {
        let ids = Tensor::zeros((n, k), DType::U32, &dev).unwrap();
        let t = fused::token_map(&ids).unwrap();
        assert!(t.device().is_cuda());
        assert_eq!(t.dims(), [n * k]);
        let want: Vec<u32> = (0..(n * k) as u32).map(|a| a / k as u32).collect();
        assert_eq!(t.to_vec1::<u32>().unwrap(), want, "N = {n}, K = {k}");
    }
}
