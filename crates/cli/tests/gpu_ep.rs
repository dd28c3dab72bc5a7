//! Expert parallelism + data parallelism on the GPU: 2 thread ranks sharing one CUDA device
//! (the collectives of `local_group`, the experts stage through the grouped-GEMM ops and the
//! all-to-all op's CUDA path) equal one rank on the whole batch: logits, routes, gradients,
//! bitwise replay, reduced routing health. Same harness as the CPU test
//! (`crates/dist/tests/common/mod.rs`). The NCCL process group across GPUs is not built yet.
//!
//! Needs the `cuda` feature and a GPU: built by `scripts/cuda/build.sh`, run by
//! `scripts/cuda/gpu_check.sh`. Without the feature this file compiles to nothing.
#![cfg(feature = "cuda")]

#[path = "../../dist/tests/common/mod.rs"]
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
