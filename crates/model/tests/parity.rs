//! Numeric parity with HF transformers 5.17 on the fixtures made by
//! `testdata/fixtures/make_fixtures.py`: logits, router probabilities, top-k ids (exact), weights,
//! the perturbed free-routing case and the forced-replay case, within 1e-4 relative.

mod common;

use candle_core::{DType, Device};
use lockstep_model::parity::run_reference;
use lockstep_model::MoeCausalLm;

fn check(name: &str) {
    let dir = common::fixture(name);
    let model = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let report = run_reference(&model, &dir.join("reference.safetensors"), 1e-4).unwrap();
    for c in &report.checks {
        println!("{:10} {:34} abs {:.3e} rel {:.3e} agree {:?} {}", c.case, c.quantity, c.max_abs, c.max_rel, c.agreement, c.pass);
        assert!(c.pass, "{name}: {} {} failed: rel {:.3e}", c.case, c.quantity, c.max_rel);
    }
    // The replay case is only meaningful if the perturbation changed routes.
    assert!(report.changed_routes > 0, "{name}: perturbation changed no route");
    assert_eq!(Some(report.changed_routes), report.reference_changed_routes, "{name}: changed-route count");
    assert!(report.passed());
}

#[test]
fn qwen3_moe_matches_transformers() {
    check("qwen3_moe_tiny");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check("qwen2_moe_tiny");
}
