//! Expert parallelism + data parallelism on the GPU: 2 thread ranks sharing one CUDA device
//! (the collectives of `local_group`, the experts stage through the grouped-GEMM ops and the
//! all-to-all op's CUDA path) equal one rank on the whole batch: logits, routes, gradients,
//! bitwise replay, reduced routing health. Same harness as the CPU test
//! (`crates/distributed/tests/common/mod.rs`); 4 thread ranks, and bf16, too. And the experts stage on received
//! rows (`gpu::experts_rows`, rows grouped by source then expert) equals the single-device
//! experts stage on the same rows bitwise, for every GEMM implementation.
//!
//! Needs the `cuda` feature and a GPU: built by `scripts/cuda/build.sh`, run by
//! `scripts/cuda/gpu_check.sh`. Without the feature this file compiles to nothing.
#![cfg(feature = "cuda")]
#![allow(non_snake_case)] // shape-suffixed names (counts_SE: S sources, E experts)

#[path = "../../distributed/tests/common/mod.rs"]
mod common;

fn gpu() -> candle_core::Device {
    candle_core::Device::new_cuda(0).expect("a CUDA device (this test runs on the GPU machine)")
}

#[test]
fn token_choice_two_ranks_equal_one_on_gpu() {
    common::check(2, false, &gpu());
}

#[test]
fn expert_choice_two_ranks_equal_one_on_gpu() {
    common::check(2, true, &gpu());
}

#[test]
fn token_choice_four_ranks_equal_one_on_gpu() {
    common::check(4, false, &gpu());
}

#[test]
fn bf16_two_ranks_equal_one_on_gpu() {
    common::check_dtype(2, false, &gpu(), candle_core::DType::BF16);
    common::check_dtype(2, true, &gpu(), candle_core::DType::BF16);
}

/// Rows from S sources, each source's rows grouped by expert, through `experts_rows` equal the
/// same rows as assignments of `experts_forward` (token = row, weight 1), bitwise: output and
/// the gradients of x, gate_up and down. Grouped / padded / loop GEMMs; one source (the
/// identity plan under the compact layouts) and three.
#[test]
fn experts_rows_equal_experts_forward_bitwise() {
    use candle_core::{DType, Tensor, Var};
    use lockstep_model::gpu::{experts_forward, experts_rows, GemmImpl};
    let dev = gpu();
    let (e, d, f) = (8usize, 64usize, 32usize);
    dev.set_seed(3).unwrap();
    let gu = Var::from_tensor(&Tensor::randn(0f32, 0.2, (e, 2 * f, d), &dev).unwrap()).unwrap();
    let dn = Var::from_tensor(&Tensor::randn(0f32, 0.2, (e, d, f), &dev).unwrap()).unwrap();
    for sources in [1usize, 3] {
        // rows of (source, expert): uneven, some empty
        let counts_SE: Vec<usize> = (0..sources * e).map(|i| (i * 7 + 3) % 11 * ((i % 5 != 2) as usize)).collect();
        let expert_R: Vec<u32> = counts_SE.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n((i % e) as u32, c)).collect();
        let r = expert_R.len();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (r, d), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (r, d), &dev).unwrap();
        let token_R = Tensor::arange(0u32, r as u32, &dev).unwrap();
        let expert_R = Tensor::from_vec(expert_R, r, &dev).unwrap();
        let ones = Tensor::ones(r, DType::F32, &dev).unwrap();
        for imp in [GemmImpl::Grouped, GemmImpl::Padded, GemmImpl::Loop] {
            let run = |rows: bool| {
                let y = if rows {
                    experts_rows(x.as_tensor(), &counts_SE, gu.as_tensor(), dn.as_tensor(), imp).unwrap()
                } else {
                    experts_forward(x.as_tensor(), &token_R, &expert_R, &ones, gu.as_tensor(), dn.as_tensor(), imp).unwrap()
                };
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![y];
                for v in [&x, &gu, &dn] {
                    out.push(grads.get(v).expect("a gradient").clone());
                }
                out
            };
            let (got, want) = (run(true), run(false));
            for (name, (a, b)) in ["y", "dx", "dgate_up", "ddown"].iter().zip(got.iter().zip(&want)) {
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(diff, 0.0, "{sources} source(s), {imp:?}: {name} differs by {diff}");
            }
        }
    }
}
