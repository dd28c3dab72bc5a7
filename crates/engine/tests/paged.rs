//! The paged KV cache under pressure and with sharing (issue #20): whatever the pool size,
//! block size, token budget or prefix cache, every request completes with the same tokens,
//! log-probabilities and routes (bit for bit) as with a roomy pool and no sharing — and those
//! equal the trainer's re-score. A 32K-token context decodes and equals the full forward.

use candle_core::{DType, Device};
use lockstep_engine::consistency::rescore;
use lockstep_engine::{CacheConfig, Completion, Engine, Request, SamplingParams};
use lockstep_model::{Kernels, MoeCausalLm};

fn model() -> MoeCausalLm {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    m
}

fn requests(n: usize, vocab: u32) -> Vec<Request> {
    (0..n)
        .map(|i| Request {
            prompt: (0..(3 + (i * 7) % 23)).map(|j| ((i * 37 + j * 11 + 1) as u32) % vocab).collect(),
            params: SamplingParams { temperature: 1.0, seed: 7 + i as u64, max_tokens: 6 + i % 5, ..SamplingParams::default() },
        })
        .collect()
}

fn bits(c: &Completion) -> (Vec<u32>, Vec<u32>, Vec<u16>, Vec<u32>) {
    let r = c.routes.as_ref().expect("routes");
    let probs = (0..r.ids().len()).map(|i| r.probs().unwrap().get_f32(i).to_bits()).collect();
    (c.tokens.clone(), c.logprobs.iter().map(|x| x.to_bits()).collect(), r.ids().to_vec(), probs)
}

fn run(reqs: &[Request], cache: CacheConfig, max_running: usize) -> (Vec<Completion>, Engine) {
    let mut e = Engine::new(model());
    e.cache = cache;
    e.max_running = max_running;
    let done = e.generate(reqs.to_vec()).unwrap();
    (done, e)
}

fn roomy() -> CacheConfig {
    CacheConfig { prefix_caching: false, ..CacheConfig::default() }
}

#[test]
fn a_tiny_pool_preempts_and_loses_nothing() {
    let m = model();
    let reqs = requests(12, m.cfg.vocab_size as u32);
    let (want, _) = run(&reqs, roomy(), 64);
    assert_eq!(want.len(), reqs.len());
    assert_eq!(rescore(&m, &want).unwrap().max_abs_logprob_diff, 0.0);
    // 10 blocks of 4 tokens: at most ~40 tokens in flight for 12 requests of up to 35
    for (num_blocks, bs, budget, prefix) in [(10usize, 4usize, 8192usize, false), (10, 4, 5, true), (9, 4, 3, false), (24, 2, 7, true)] {
        let cache = CacheConfig { block_size: bs, num_blocks: Some(num_blocks), max_batched_tokens: budget, prefix_caching: prefix, ..CacheConfig::default() };
        let (got, e) = run(&reqs, cache, 64);
        assert_eq!(got.len(), reqs.len(), "{num_blocks} blocks of {bs}: a request was lost");
        assert!(e.num_preemptions() > 0, "{num_blocks} blocks of {bs}: the pool should have run out");
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(bits(a), bits(b), "{num_blocks} blocks of {bs}, budget {budget}: request {}", a.id);
        }
        let (_, held, _) = e.cache_usage();
        assert_eq!(held, 0, "every block given back");
    }
}

#[test]
fn a_request_larger_than_the_pool_is_refused_by_name() {
    let mut e = Engine::new(model());
    e.cache = CacheConfig { block_size: 4, num_blocks: Some(3), ..CacheConfig::default() };
    e.generate(requests(1, 64)).unwrap();
    let big = Request { prompt: vec![1; 10], params: SamplingParams { max_tokens: 5, ..SamplingParams::default() } };
    let err = e.submit(big).unwrap_err().to_string();
    assert!(err.contains("max_tokens") && err.contains("3"), "{err}");
}

#[test]
fn group_samples_share_the_prompt_and_match_unshared() {
    let m = model();
    let prompt: Vec<u32> = (0..37).map(|j| (j * 13 % 61) as u32).collect();
    let reqs: Vec<Request> = (0..6)
        .map(|s| Request { prompt: prompt.clone(), params: SamplingParams { temperature: 1.0, seed: s, max_tokens: 9, ..SamplingParams::default() } })
        .collect();
    let (want, plain) = run(&reqs, roomy(), 64);
    let (got, shared) = run(&reqs, CacheConfig { block_size: 4, ..CacheConfig::default() }, 64);
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(bits(a), bits(b), "sample {}", a.id);
        assert_eq!(a.routes.as_ref().unwrap().num_tokens(), 37 + 9, "every token's route, cached ones included");
    }
    // the prompt's 9 full blocks (36 tokens) are computed once, not six times
    assert_eq!(plain.num_forwarded_tokens() - shared.num_forwarded_tokens(), 5 * 36, "{} vs {}", plain.num_forwarded_tokens(), shared.num_forwarded_tokens());
    assert_eq!(rescore(&m, &got).unwrap().max_abs_logprob_diff, 0.0);
}

#[test]
fn a_later_turn_hits_the_prefix_cache_with_real_routes() {
    let m = model();
    let first = Request { prompt: (0..21).map(|j| (j * 7 % 50) as u32).collect(), params: SamplingParams { seed: 1, max_tokens: 8, ..SamplingParams::default() } };
    let mut e = Engine::new(model());
    e.cache = CacheConfig { block_size: 4, ..CacheConfig::default() };
    let c1 = e.generate(vec![first]).unwrap().remove(0);
    let mut turn2 = c1.sequence();
    turn2.extend([5, 6, 7]);
    let second = Request { prompt: turn2, params: SamplingParams { seed: 2, max_tokens: 5, ..SamplingParams::default() } };
    let before = e.num_forwarded_tokens();
    let c2 = e.generate(vec![second.clone()]).unwrap().remove(0);
    let computed = e.num_forwarded_tokens() - before;
    assert!(computed < 10, "the first turn's blocks are reused: {computed} tokens computed");
    let (want, _) = run(&[second], roomy(), 4);
    assert_eq!(bits(&c2), bits(&want[0]));
    assert_eq!(rescore(&m, &[c2]).unwrap().route_agreement, 1.0);
}

/// A narrow model (one MoE layer, two query heads over one kv head of 8): the attention over
/// 32K keys is what is tested, and this keeps it to seconds on two CPU cores.
fn narrow() -> MoeCausalLm {
    let cfg = lockstep_model::ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "moe_intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "max_position_embeddings": 40960}"#,
        "narrow",
    )
    .unwrap();
    let mut m = MoeCausalLm::random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    m
}

#[test]
fn a_32k_context_decodes_like_the_full_forward() {
    let m = narrow();
    let prompt: Vec<u32> = (0..32_760u32).map(|j| (j.wrapping_mul(2_654_435_761u32) >> 7) % m.cfg.vocab_size as u32).collect();
    let req = Request { prompt, params: SamplingParams { seed: 3, max_tokens: 8, ..SamplingParams::default() } };
    let mut e = Engine::new(m.clone());
    e.cache = CacheConfig { max_batched_tokens: 8192, ..CacheConfig::default() };
    let got = e.generate(vec![req]).unwrap();
    assert_eq!(got[0].tokens.len(), 8);
    assert!(e.num_forwarded_tokens() >= 32_768);
    let rep = rescore(&m, &got).unwrap();
    assert_eq!(rep.max_abs_logprob_diff, 0.0, "{rep:?}");
    assert_eq!(rep.route_agreement, 1.0, "{rep:?}");
}
