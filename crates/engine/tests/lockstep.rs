//! The headline: with batch-invariant kernels the engine's log-probabilities and routes equal,
//! bit for bit, what the trainer's packed forward computes for the same tokens — at batch 1 and
//! 16, mixed prompt lengths, on the default and on a wide model.

use candle_core::{DType, Device};
use lockstep_engine::consistency::rescore;
use lockstep_engine::{Engine, Request, Sampler, SamplingParams};
use lockstep_model::{Kernels, ModelConfig, MoeCausalLm};

fn requests(n: usize, vocab: u32, max_tokens: usize) -> Vec<Request> {
    (0..n)
        .map(|i| Request {
            prompt: (0..(1 + (i * 5) % 19)).map(|j| ((i * 37 + j * 11 + 1) as u32) % vocab).collect(),
            params: SamplingParams { temperature: 1.0, seed: 100 + i as u64, max_tokens: max_tokens + i % 4, ..SamplingParams::default() },
        })
        .collect()
}

fn check(model: MoeCausalLm, n: usize, max_tokens: usize) {
    check_with(model, n, max_tokens, Sampler::Exact);
}

fn check_with(model: MoeCausalLm, n: usize, max_tokens: usize, sampler: Sampler) {
    let reqs = requests(n, model.cfg.vocab_size as u32, max_tokens);
    let mut engine = Engine::new(model.clone());
    engine.set_sampler(sampler).unwrap();
    let done = engine.generate(reqs.clone()).unwrap();
    assert_eq!(done.len(), n);
    for (c, r) in done.iter().zip(&reqs) {
        assert_eq!(c.prompt, r.prompt);
        let route = c.routes.as_ref().unwrap();
        assert_eq!(route.num_tokens(), c.prompt.len() + c.tokens.len(), "a route row for every token");
        assert_eq!(route.num_missing(), 0, "none missing");
    }
    let rep = rescore(&model, &done).unwrap();
    assert_eq!(rep.max_abs_logprob_diff, 0.0, "{rep:?}");
    assert_eq!(rep.route_agreement, 1.0, "{rep:?}");
    assert_eq!(rep.prob_rows_differing, 0, "{rep:?}");
    // batch independence: each request alone generates the same tokens
    let mut solo = Engine::new(model);
    solo.set_sampler(sampler).unwrap();
    let one = solo.generate(vec![reqs[n - 1].clone()]).unwrap();
    assert_eq!(one[0].tokens, done[n - 1].tokens);
    assert_eq!(one[0].logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), done[n - 1].logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}

#[test]
fn default_model_lockstep_batch_16_and_1() {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    check(m.clone(), 16, 8);
    check(m, 1, 8);
}

/// The device sampler (Gumbel-max, here on the CPU): the same guarantees — log-probabilities
/// and routes equal the trainer's re-score, a request alone draws what it draws in a batch —
/// and a different stream from the exact sampler's for the same seeds.
#[test]
fn gumbel_sampler_lockstep_batch_16_and_1() {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    check_with(m.clone(), 16, 8, Sampler::Gumbel);
    check_with(m.clone(), 1, 8, Sampler::Gumbel);
    let reqs = requests(4, m.cfg.vocab_size as u32, 12);
    let mut a = Engine::new(m.clone());
    let mut b = Engine::new(m);
    b.set_sampler(Sampler::Gumbel).unwrap();
    let (ta, tb) = (a.generate(reqs.clone()).unwrap(), b.generate(reqs).unwrap());
    assert_ne!(ta.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>(), tb.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>());
}

#[test]
fn wide_model_lockstep() {
    let cfg = ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 1024,
        "intermediate_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true}"#,
        "wide",
    )
    .unwrap();
    let mut m = MoeCausalLm::random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    check(m, 16, 3);
}

#[test]
fn bad_requests_are_named() {
    let m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let mut e = Engine::new(m);
    let mut err = |prompt: Vec<u32>, params: SamplingParams| e.submit(Request { prompt, params }).unwrap_err().to_string();
    assert!(err(vec![], SamplingParams::default()).contains("prompt"));
    assert!(err(vec![999], SamplingParams::default()).contains("vocab_size"));
    assert!(err(vec![1], SamplingParams { top_p: 0.0, ..SamplingParams::default() }).contains("top_p"));
    assert!(err(vec![1], SamplingParams { max_tokens: 0, ..SamplingParams::default() }).contains("max_tokens"));
    let mut e2 = Engine::new(MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap());
    let stop = e2
        .generate(vec![Request { prompt: vec![1, 2], params: SamplingParams { temperature: 0.0, max_tokens: 50, stop_token_ids: (0..256).collect(), ..SamplingParams::default() } }])
        .unwrap();
    assert_eq!(stop[0].tokens.len(), 1, "any token stops");
    assert_eq!(stop[0].finish, lockstep_engine::FinishReason::Stop);
}

/// Expert choice over one-token pools (`block:1`) is per token and causal: it generates token by
/// token and stays in lockstep with the trainer (every expert takes every token: C = 1 of 1).
#[test]
fn expert_choice_block1_lockstep() {
    use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_routing(RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: Pool::Block(1) }, AttentionMode::Causal, false).unwrap();
    m.set_kernels(Kernels::Invariant);
    assert_eq!(lockstep_engine::engine::route_width(&m), m.cfg.moe.router.num_experts);
    check(m.clone(), 16, 6);
    check(m, 1, 6);
}

/// Wider expert-choice pools pick a token's experts by later tokens: the engine refuses them
/// (and non-causal attention) with an error naming the field.
#[test]
fn engine_refuses_non_causal_routing() {
    use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
    let req = Request { prompt: vec![1, 2, 3], params: SamplingParams::default() };
    for (pool, attention, field) in [
        (Pool::Sequence, AttentionMode::Causal, "expert_choice_pool"),
        (Pool::Block(4), AttentionMode::Causal, "expert_choice_pool"),
        (Pool::Batch, AttentionMode::Causal, "expert_choice_pool"),
        (Pool::Sequence, AttentionMode::Bidirectional, "attention_mode"),
    ] {
        let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
        m.set_routing(RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool }, attention, true).unwrap();
        let e = Engine::new(m).submit(req.clone()).unwrap_err().to_string();
        assert!(e.contains(field), "{pool:?} {attention:?}: {e}");
        if field == "expert_choice_pool" {
            assert!(e.contains("block:1") && e.contains("token by token"), "{e}");
        }
    }
}
