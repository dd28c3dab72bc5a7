//! The variable-length attention's backward (one sequence at a time over its own keys) against
//! candle's autograd through a dense masked softmax attention, causal and bidirectional, with
//! grouped kv heads, over a packed row of sequences of different lengths.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use lockstep_model::nn::varlen::{attention, KeyLayout};

const H: usize = 4;
const G: usize = 2;
const DH: usize = 8;

fn dense_reference(q: &Tensor, k: &Tensor, v: &Tensor, runs: &[(usize, usize)], causal: bool, scale: f64) -> Tensor {
    let n = q.dim(0).unwrap();
    let mut bias = vec![f32::NEG_INFINITY; n * n];
    for &(s, l) in runs {
        for i in 0..l {
            let visible = if causal { i + 1 } else { l };
            for j in 0..visible {
                bias[(s + i) * n + s + j] = 0.0;
            }
        }
    }
    let bias = Tensor::from_vec(bias, (1, n, n), &Device::Cpu).unwrap();
    let qh = q.transpose(0, 1).unwrap().contiguous().unwrap(); // [H, N, Dh]
    let rep = |x: &Tensor| x.transpose(0, 1).unwrap().unsqueeze(1).unwrap().broadcast_as((G, H / G, n, DH)).unwrap().reshape((H, n, DH)).unwrap();
    let (kh, vh) = (rep(k), rep(v));
    let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&bias).unwrap();
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    p.matmul(&vh).unwrap().transpose(0, 1).unwrap().contiguous().unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
}

#[test]
fn varlen_backward_matches_dense_autograd() {
    let runs = [(0usize, 5usize), (5, 1), (6, 9), (15, 3)];
    let n: usize = runs.iter().map(|r| r.1).sum();
    let scale = 1.0 / (DH as f64).sqrt();
    let dev = Device::Cpu;
    for causal in [true, false] {
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, H, DH), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, G, DH), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, G, DH), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, H, DH), &dev).unwrap();
        let layout = Arc::new(KeyLayout::packed(&runs, |i, len| if causal { i + 1 } else { len }).unwrap());
        let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), layout, scale as f32).unwrap();
        let reference = dense_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &runs, causal, scale);
        assert!(max_rel(&ours, &reference) < 1e-5, "forward, causal {causal}");
        let ga = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
            assert_eq!(a.dims(), b.dims());
            let e = max_rel(a, b);
            assert!(e < 1e-5, "d{name}, causal {causal}: relative error {e}");
        }
    }
}

#[test]
fn varlen_backward_keeps_bf16_inputs_bf16() {
    let runs = [(0usize, 4usize), (4, 6)];
    let dev = Device::Cpu;
    let mk = |h: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (10, h, DH), &dev).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
    let (q, k, v) = (mk(H), mk(G), mk(G));
    let layout = Arc::new(KeyLayout::packed(&runs, |i, _| i + 1).unwrap());
    let out = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), layout, 0.35).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let g = out.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    for x in [&q, &k, &v] {
        let gx = g.get(x.as_tensor()).unwrap();
        assert_eq!(gx.dtype(), DType::BF16);
        assert!(gx.to_dtype(DType::F32).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
    }
}
