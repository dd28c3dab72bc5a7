//! The token-choice router's fused ops (`moe::router::fused`) on the CPU against the composed
//! candle ops they replace: the softmax against `candle_nn::ops::softmax`, the top-k weights
//! against gather → sum → (+ 1e-20) → div → × scale, for every weight rule (softmax / sigmoid
//! renormalised or not, scaled or not, K = 1 and K = E); both ops' gradients against candle's
//! autograd through the composed ops under random upstream gradients; the token map; a row's
//! bits alone and in a batch; and the named errors of bad inputs.

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use lockstep_model::config::{RouterConfig, ScoreFunction};
use lockstep_model::moe::router::fused::{self, Renorm, WeightRule};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    host(t).iter().map(|x| x.to_bits()).collect()
}

/// max over elements of |a − b| / max(|b|, tiny)
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-30)).fold(0f32, f32::max)
}

/// max |a − b| / max |b| (gradients: entries near 0 are differences of larger terms)
fn max_rel_norm(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-30)
}

/// [N, K] u32: K distinct experts per row, random order
fn random_ids(n: usize, e: usize, k: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut row: Vec<u32> = (0..e as u32).collect();
        row.shuffle(&mut rng);
        ids.extend_from_slice(&row[..k]);
    }
    Tensor::from_vec(ids, (n, k), &Device::Cpu).unwrap()
}

fn rule(score: ScoreFunction, norm: bool, scale: f64) -> WeightRule {
    let mut cfg = RouterConfig::softmax_top_k(8, 2, norm);
    cfg.score_function = score;
    cfg.routed_scaling_factor = scale;
    WeightRule::of(&cfg)
}

/// Every weight rule the routers use (name, score function, rule).
fn rules() -> Vec<(String, ScoreFunction, WeightRule)> {
    let mut out = Vec::new();
    for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        for norm in [true, false] {
            for scale in [1.0, 2.5] {
                out.push((format!("{score:?} norm={norm} scale={scale}"), score, rule(score, norm, scale)));
            }
        }
    }
    out
}

/// The composed ops `token_choice::weights_at` ran before the fusion.
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

fn sigmoid_scores(n: usize, e: usize, seed: u64) -> Tensor {
    candle_nn::ops::sigmoid(&randn(&[n, e], 4.0, seed)).unwrap()
}

#[test]
fn rule_of_config() {
    assert_eq!(rule(ScoreFunction::Softmax, true, 1.0).renorm, Renorm::Sum);
    assert_eq!(rule(ScoreFunction::Sigmoid, true, 1.0).renorm, Renorm::SumEps(1e-20));
    assert_eq!(rule(ScoreFunction::Sigmoid, false, 1.0).renorm, Renorm::None);
    assert_eq!(rule(ScoreFunction::Softmax, false, 2.5).scale, 2.5);
}

#[test]
fn softmax_matches_candle() {
    for (i, &e) in [1usize, 2, 7, 31, 32, 33, 64, 128, 160, 257].iter().enumerate() {
        for scale in [1.0f32, 30.0] {
            let x = randn(&[19, e], scale, 10 + i as u64);
            let got = fused::softmax(&x).unwrap();
            let want = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
            assert_eq!(got.dims(), want.dims());
            let r = max_rel(&got, &want);
            assert!(r <= 1e-6, "E = {e}, logits x{scale}: max relative error {r}");
        }
    }
    // any rank: the last dim
    let x = randn(&[3, 5, 40], 2.0, 7);
    let r = max_rel(&fused::softmax(&x).unwrap(), &candle_nn::ops::softmax(&x, D::Minus1).unwrap());
    assert!(r <= 1e-6, "rank 3: {r}");
    // a non-contiguous view is made contiguous first
    let xt = randn(&[40, 6], 2.0, 8).t().unwrap();
    let r = max_rel(&fused::softmax(&xt).unwrap(), &candle_nn::ops::softmax(&xt, D::Minus1).unwrap());
    assert!(r <= 1e-6, "transposed: {r}");
    // no rows
    assert_eq!(fused::softmax(&Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap()).unwrap().dims(), [0, 8]);
}

#[test]
fn softmax_follows_the_documented_order() {
    let x = randn(&[5, 77], 3.0, 3);
    let got = host(&fused::softmax(&x).unwrap());
    for (r, row) in host(&x).chunks(77).enumerate() {
        let mut out = vec![0f32; 77];
        fused::softmax_row(row, &mut out);
        let want: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got[r * 77..(r + 1) * 77].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "row {r}");
    }
}

#[test]
fn rows_are_batch_invariant() {
    let (n, e, k) = (300usize, 96usize, 6usize);
    let x = randn(&[n, e], 3.0, 4);
    let ids = random_ids(n, e, k, 5);
    let r = rule(ScoreFunction::Softmax, true, 2.5);
    let s = fused::softmax(&x).unwrap();
    let (p, w) = fused::topk_weights(&s, &ids, r).unwrap();
    for row in [0usize, 17, 299] {
        let s1 = fused::softmax(&x.narrow(0, row, 1).unwrap()).unwrap();
        assert_eq!(bits(&s1), bits(&s.narrow(0, row, 1).unwrap()), "softmax row {row}");
        let (p1, w1) = fused::topk_weights(&s1, &ids.narrow(0, row, 1).unwrap(), r).unwrap();
        assert_eq!(bits(&p1), bits(&p.narrow(0, row, 1).unwrap()), "probs row {row}");
        assert_eq!(bits(&w1), bits(&w.narrow(0, row, 1).unwrap()), "weights row {row}");
    }
}

#[test]
fn weights_match_composed() {
    let (n, e) = (23usize, 16usize);
    for (name, score, r) in rules() {
        let scores = match score {
            ScoreFunction::Sigmoid => sigmoid_scores(n, e, 1),
            ScoreFunction::Softmax => fused::softmax(&randn(&[n, e], 3.0, 1)).unwrap(),
        };
        for k in [1usize, 2, 5, e] {
            let ids = random_ids(n, e, k, 2 + k as u64);
            let (p, w) = fused::topk_weights(&scores, &ids, r).unwrap();
            let (pc, wc) = composed_weights(&scores, &ids, r);
            assert_eq!((p.dims(), w.dims()), ([n, k].as_slice(), [n, k].as_slice()), "{name} K = {k}");
            assert!(p.is_contiguous() && w.is_contiguous(), "{name}: both halves contiguous");
            assert_eq!(bits(&p), bits(&pc), "{name} K = {k}: probs are the gathered scores");
            let rel = max_rel(&w, &wc);
            assert!(rel <= 1e-6, "{name} K = {k}: weights max relative error {rel}");
        }
    }
    // the [2, N, K] form
    let scores = fused::softmax(&randn(&[4, 8], 1.0, 9)).unwrap();
    let ids = random_ids(4, 8, 3, 9);
    let both = fused::topk_weights_2NK(&scores, &ids, rule(ScoreFunction::Softmax, true, 1.0)).unwrap();
    assert_eq!(both.dims(), [2, 4, 3]);
    assert_eq!(bits(&both.i(0).unwrap()), bits(&scores.gather(&ids, 1).unwrap()));
    // K = E with renormalisation: the weights of a softmax row sum to ~1
    let (_, w) = fused::topk_weights(&scores, &random_ids(4, 8, 8, 1), rule(ScoreFunction::Softmax, true, 1.0)).unwrap();
    for s in host(&w.sum(1).unwrap()) {
        assert!((s - 1.0).abs() < 1e-6, "{s}");
    }
    // no tokens
    let (p, w) = fused::topk_weights(&Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap(), &Tensor::zeros((0, 2), DType::U32, &Device::Cpu).unwrap(), rule(ScoreFunction::Softmax, true, 1.0)).unwrap();
    assert_eq!((p.dims(), w.dims()), ([0, 2].as_slice(), [0, 2].as_slice()));
}

/// The gradient of Σ gs·s + Σ gp·p + Σ gw·w with respect to the logits, through the fused ops
/// and through the composed ones, for random upstream gradients.
#[test]
fn gradients_match_autograd() {
    let (n, e) = (13usize, 12usize);
    for (name, score, r) in rules() {
        let sigmoid = score == ScoreFunction::Sigmoid;
        for k in [1usize, 3, e] {
            let seed = 100 + k as u64;
            let logits = Var::from_tensor(&randn(&[n, e], 2.0, seed)).unwrap();
            let ids = random_ids(n, e, k, seed + 1);
            let (gs, gp, gw) = (randn(&[n, e], 1.0, seed + 2), randn(&[n, k], 1.0, seed + 3), randn(&[n, k], 1.0, seed + 4));
            let loss = |s: &Tensor, p: &Tensor, w: &Tensor| -> Tensor {
                let a = (s * &gs).unwrap().sum_all().unwrap();
                let b = (p * &gp).unwrap().sum_all().unwrap();
                let c = (w * &gw).unwrap().sum_all().unwrap();
                ((a + b).unwrap() + c).unwrap()
            };
            // fused: softmax (sigmoid routers: candle's sigmoid) then the weights op
            let s = if sigmoid { candle_nn::ops::sigmoid(logits.as_tensor()).unwrap() } else { fused::softmax(logits.as_tensor()).unwrap() };
            let (p, w) = fused::topk_weights(&s, &ids, r).unwrap();
            let g_fused = loss(&s, &p, &w).backward().unwrap().get(logits.as_tensor()).unwrap().clone();
            // composed
            let s = if sigmoid { candle_nn::ops::sigmoid(logits.as_tensor()).unwrap() } else { candle_nn::ops::softmax(logits.as_tensor(), D::Minus1).unwrap() };
            let (p, w) = composed_weights(&s, &ids, r);
            let g_comp = loss(&s, &p, &w).backward().unwrap().get(logits.as_tensor()).unwrap().clone();
            let rel = max_rel_norm(&g_fused, &g_comp);
            assert!(rel <= 1e-5, "{name} K = {k}: logits gradient max relative error {rel}");
        }
    }
}

/// The weights op's backward alone (scores a leaf), and the fused softmax's alone.
#[test]
fn each_backward_alone() {
    let (n, e) = (9usize, 10usize);
    for (name, _, r) in rules() {
        for k in [1usize, 4, e] {
            let scores = Var::from_tensor(&sigmoid_scores(n, e, 40 + k as u64)).unwrap();
            let ids = random_ids(n, e, k, 41);
            let (gp, gw) = (randn(&[n, k], 1.0, 42), randn(&[n, k], 1.0, 43));
            let grad = |(p, w): (Tensor, Tensor)| -> Tensor {
                let l = ((p * &gp).unwrap().sum_all().unwrap() + (w * &gw).unwrap().sum_all().unwrap()).unwrap();
                l.backward().unwrap().get(scores.as_tensor()).unwrap().clone()
            };
            let g_fused = grad(fused::topk_weights(scores.as_tensor(), &ids, r).unwrap());
            let g_comp = grad(composed_weights(scores.as_tensor(), &ids, r));
            let rel = max_rel_norm(&g_fused, &g_comp);
            assert!(rel <= 1e-5, "{name} K = {k}: scores gradient max relative error {rel}");
            // only the chosen experts get a gradient
            let hit: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
            let g = host(&g_fused);
            for t in 0..n {
                for x in 0..e {
                    if !hit[t * k..(t + 1) * k].contains(&(x as u32)) {
                        assert_eq!(g[t * e + x], 0.0, "{name}: expert {x} of token {t} not chosen");
                    }
                }
            }
        }
    }
    for e in [1usize, 5, 33, 100] {
        let x = Var::from_tensor(&randn(&[7, e], 3.0, e as u64)).unwrap();
        let g = randn(&[7, e], 1.0, 1 + e as u64);
        let grad = |s: Tensor| (s * &g).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let rel = max_rel_norm(&grad(fused::softmax(x.as_tensor()).unwrap()), &grad(candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap()));
        assert!(rel <= 1e-5, "softmax E = {e}: gradient max relative error {rel}");
    }
}

#[test]
fn token_map_is_a_over_k() {
    for (n, k) in [(5usize, 3usize), (4, 1), (1, 8), (0, 2)] {
        let ids = Tensor::zeros((n, k), DType::U32, &Device::Cpu).unwrap();
        let t = fused::token_map(&ids).unwrap();
        assert_eq!(t.dims(), [n * k]);
        assert_eq!(t.dtype(), DType::U32);
        let want: Vec<u32> = (0..(n * k) as u32).map(|a| a / k as u32).collect();
        assert_eq!(t.to_vec1::<u32>().unwrap(), want, "N = {n}, K = {k}");
    }
    // the ids' dtype does not matter, only their shape
    let t = fused::token_map(&Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(t.to_vec1::<u32>().unwrap(), [0, 0, 1, 1, 2, 2]);
}

fn err_of(r: candle_core::Result<impl std::fmt::Debug>) -> String {
    format!("{}", r.expect_err("expected an error"))
}

#[test]
fn bad_inputs_are_named() {
    let cpu = Device::Cpu;
    let s = fused::softmax(&randn(&[4, 8], 1.0, 1)).unwrap();
    let ids = random_ids(4, 8, 2, 1);
    let r = rule(ScoreFunction::Softmax, true, 1.0);
    let e = err_of(fused::softmax(&s.to_dtype(DType::BF16).unwrap()));
    assert!(e.contains("router softmax") && e.contains("f32") && e.contains("BF16"), "{e}");
    let e = err_of(fused::softmax(&Tensor::new(1f32, &cpu).unwrap()));
    assert!(e.contains("router softmax") && e.contains("scalar"), "{e}");
    let e = err_of(fused::topk_weights(&s.to_dtype(DType::BF16).unwrap(), &ids, r));
    assert!(e.contains("router top-k weights") && e.contains("BF16"), "{e}");
    let e = err_of(fused::topk_weights(&s, &ids.to_dtype(DType::F32).unwrap(), r));
    assert!(e.contains("router top-k weights") && e.contains("u32"), "{e}");
    let e = err_of(fused::topk_weights(&s, &ids.narrow(0, 0, 3).unwrap(), r));
    assert!(e.contains("router top-k weights") && e.contains("disagree on N"), "{e}");
    let e = err_of(fused::topk_weights(&s.flatten_all().unwrap(), &ids, r));
    assert!(e.contains("router top-k weights") && e.contains("[N, E]"), "{e}");
    let bad = Tensor::new(&[[0u32, 8], [1, 2], [3, 4], [5, 6]], &cpu).unwrap();
    let e = err_of(fused::topk_weights(&s, &bad, r));
    assert!(e.contains("router top-k weights") && e.contains("expert id 8") && e.contains("8 experts"), "{e}");
    let e = err_of(fused::token_map(&ids.flatten_all().unwrap()));
    assert!(e.contains("router token map") && e.contains("[N, K]"), "{e}");
}
