//! Gradients equal PyTorch's (`testdata/fixtures/*/grads.safetensors`, made by
//! `testdata/fixtures/make_fixtures.py`) within 1e-4 relative, router weights included.

use std::path::PathBuf;

use candle_core::{DType, Device};
use lockstep_model::MoeCausalLm;
use lockstep_trainer::grads::run_grads_reference;

fn check(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fixtures").join(name);
    let model = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let checks = run_grads_reference(&model, &dir.join("grads.safetensors"), &dir.join("reference.safetensors"), 1e-4).unwrap();
    let mut routers = 0;
    for c in &checks {
        println!("{:50} abs {:.3e} rel {:.3e}", c.quantity, c.max_abs, c.max_rel);
        assert!(c.pass, "{name}: {} rel {:.3e}", c.quantity, c.max_rel);
        if c.quantity.ends_with("mlp.gate.weight") {
            routers += 1;
        }
    }
    assert!(routers > 0);
}

#[test]
fn qwen3_moe_gradients_match_pytorch() {
    check("qwen3_moe_tiny");
}

#[test]
fn qwen2_moe_gradients_match_pytorch() {
    check("qwen2_moe_tiny");
}

#[test]
fn glm4_moe_gradients_match_pytorch() {
    check("glm4_moe_tiny");
}

fn check_extra(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/extra_fixtures").join(name);
    let model = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let checks = run_grads_reference(&model, &dir.join("grads.safetensors"), &dir.join("reference.safetensors"), 1e-4).unwrap();
    assert!(checks.len() > 20);
    for c in &checks {
        assert!(c.pass, "{name}: {} rel {:.3e}", c.quantity, c.max_rel);
    }
}

/// Dense layers between MoE layers, top-4 of 16, no renorm, tied embeddings
/// (`scripts/make_extra_fixtures.py`).
#[test]
fn dense_gaps_top4_tied_gradients_match_pytorch() {
    check_extra("qwen3_moe_dense_gaps");
}

/// decoder_sparse_step 2, top-3 of 12, bf16 weights in shards (`scripts/make_extra_fixtures.py`).
#[test]
fn sparse_step_bf16_sharded_gradients_match_pytorch() {
    check_extra("qwen2_moe_sparse_step_bf16_sharded");
}

/// The batch-invariant kernels carry gradients that match PyTorch too.
#[test]
fn invariant_kernels_gradients_match_pytorch() {
    for name in ["qwen3_moe_tiny", "glm4_moe_tiny"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fixtures").join(name);
        let mut model = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        model.set_kernels(lockstep_model::Kernels::Invariant);
        let checks = run_grads_reference(&model, &dir.join("grads.safetensors"), &dir.join("reference.safetensors"), 1e-4).unwrap();
        for c in &checks {
            assert!(c.pass, "{name}: {} rel {:.3e}", c.quantity, c.max_rel);
        }
    }
}
