//! The memory plan (`lockstep_trainer::memory`): bytes per parameter by dtype, what activation
//! checkpointing and LM-head chunks save, and the Qwen3-30B-A3B-width figures by hand.

use candle_core::{DType, Device};
use lockstep_model::{ModelConfig, MoeCausalLm};
use lockstep_trainer::memory::MemoryPlan;
use lockstep_trainer::trainer::{Trainer, TrainerConfig};

#[test]
fn plan_counts_states_and_activations() {
    let model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let n: u64 = model.named_params().unwrap().iter().map(|(_, t)| t.elem_count() as u64).sum();
    let f32_plan = Trainer::new(model.clone(), TrainerConfig::default()).unwrap().memory_plan(1024);
    assert_eq!(f32_plan.parameters, n);
    assert_eq!(f32_plan.states(), 16 * n, "f32: weights 4 + moments 8 + gradient sums 4");
    let bf16 = Trainer::new(model.clone(), TrainerConfig { dtype: DType::BF16, ..TrainerConfig::default() }).unwrap().memory_plan(1024);
    assert_eq!(bf16.states(), 18 * n, "bf16: weights 2 + master 4 + moments 8 + gradient sums 4");
    assert_eq!(bf16.activations_per_token * 2, f32_plan.activations_per_token + moe_f32_router_bytes(&model.cfg));
    let ck = Trainer::new(model, TrainerConfig { activation_checkpointing: true, ..TrainerConfig::default() }).unwrap().memory_plan(1024);
    assert!(ck.activations() < f32_plan.activations() / 2, "{ck} vs {f32_plan}");
    assert!(f32_plan.to_string().contains("B/parameter"));
}

/// The router's f32 logits and scores per token (2·E·4 B per MoE layer) are the part of the
/// activations that does not halve in bf16.
fn moe_f32_router_bytes(cfg: &ModelConfig) -> u64 {
    let moe_layers = (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).count() as u64;
    moe_layers * 2 * cfg.moe.router.num_experts as u64 * 4
}

#[test]
fn qwen3_30b_width_by_hand() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/configs/qwen3_30b_a3b.json")).unwrap();
    let mut cfg = ModelConfig::from_json_str(&text, "qwen3_30b_a3b.json").unwrap();
    cfg.num_layers = 8;
    // D 2048, H·Dh 4096, G·Dh 512, E 128, K 8, I 768: per layer 8·2048 + 3·4096 + 4·512 +
    // 8·(3·2048 + 3·768) elements (bf16) + 2·128 f32
    let per_layer = (8 * 2048 + 3 * 4096 + 4 * 512 + 8 * (3 * 2048 + 3 * 768)) * 2 + 2 * 128 * 4;
    let p = MemoryPlan::of(&cfg, 5_600_000_000, DType::BF16, false, 16384, 1024);
    assert_eq!(p.activations_per_token, 8 * per_layer);
    assert_eq!(p.states(), 18 * 5_600_000_000);
    assert_eq!(p.head_chunk, 2 * 4 * 4 * 1024 * 151936);
    let c = MemoryPlan::of(&cfg, 5_600_000_000, DType::BF16, true, 16384, 1024);
    assert_eq!(c.activations_per_token, 8 * 2048 * 2 + per_layer);
}
