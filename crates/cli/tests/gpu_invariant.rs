//! The batch-invariant kernels on CUDA (`crates/model/src/gpu/invariant.cu`): a row's result is
//! bit for bit the same alone or among many rows, so the engine's decode on the GPU gives the
//! trainer's log-probabilities exactly.
//!
//! - the matmul (f32, bf16; three products in one launch as three) and the variable-length
//!   attention: a row alone equals the same row in larger launches (the attention: a query alone
//!   over a paged pool in reverse block order, past 12,256 keys, equals it in a packed causal
//!   forward), within rounding of the CPU kernels;
//! - whole models on the GPU (the embedded default and the wide one, hidden 1024): a sequence
//!   alone, packed with others and in a padded batch gives the same logits and routes; decoding
//!   through the paged KV cache equals the full forward;
//! - the engine against the trainer's re-score (`lockstep_engine::consistency::rescore`): max
//!   |Δ logprob| 0 and every route equal, in f32 and bf16, for token and expert choice;
//! - the invariant forward's gradients agree with candle's kernels' to rounding; the
//!   tensor-core attention backward agrees with the f32 reference backward;
//! - the device sampler (Gumbel-max) draws what the host definition draws, a row alone as in a
//!   batch of 64 over a 151,936-token vocabulary.
//!
//! (In the cli crate: it builds with the binary's exact features.) Needs the `cuda` feature and
//! a GPU: built by `scripts/cuda/build.sh`, run by `scripts/cuda/gpu_check.sh`.
#![cfg(feature = "cuda")]
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use lockstep_engine::consistency::rescore;
use lockstep_engine::{Engine, Request, SamplingParams};
use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
use lockstep_model::nn::invariant;
use lockstep_model::{Batch, Kernels, ModelConfig, MoeCausalLm, RoutingPlan};
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

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / s.max(1e-30)
}

/// The experts' grouped product: an expert's rows give the same bits whichever kernel the
/// batch picks (64 x 64 tiles when the experts hold many rows, 16 x 16 when few) and whether the
/// counts stay on the device (a deferred plan through the MoE block) or not; and equal the plain
/// matmul of the same rows.
#[test]
fn grouped_rows_are_batch_invariant() {
    let dev = gpu();
    // K = 200: the 16 x 16 kernel for few rows; K = 256, 272: the thin one (K % 16 = 0; 272 %
    // 32 = 16: an extra zero step, as the other kernels take)
    for (dtype, k) in [(DType::F32, 200usize), (DType::BF16, 200), (DType::BF16, 256), (DType::BF16, 272)] {
        let (e, n) = (4usize, 160usize);
        let w = randn(&[e, n, k], 5, &dev).to_dtype(dtype).unwrap();
        let counts = [1000usize, 3, 0, 333];
        let a: usize = counts.iter().sum();
        let x = randn(&[a, k], 6, &dev).to_dtype(dtype).unwrap();
        let all = invariant::grouped_matmul_nt(&x, &w, &counts).unwrap();
        let mut start = 0;
        for (ex, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            for &m in &[1usize, 5, 20, c] {
                let m = m.min(c);
                let mut few = [0usize; 4];
                few[ex] = m;
                let part = invariant::grouped_matmul_nt(&x.narrow(0, start, m).unwrap(), &w, &few).unwrap();
                assert_eq!(bits(&part), bits(&all.narrow(0, start, m).unwrap()), "{dtype:?} expert {ex}: first {m} of its {c} rows");
                let plain = invariant::matmul_nt(&x.narrow(0, start, m).unwrap(), &w.get(ex).unwrap()).unwrap();
                assert_eq!(bits(&plain), bits(&part), "{dtype:?} expert {ex}: grouped vs plain matmul");
            }
            start += c;
        }
    }
}

#[test]
fn gumbel_sampling_on_the_gpu_equals_the_host() {
    use lockstep_model::gumbel;
    let dev = gpu();
    let (r, v) = (64usize, 151_936usize);
    let logits = (randn(&[r, v], 11, &dev) * 4.0).unwrap();
    let rows: Vec<(u64, f32)> = (0..r).map(|i| (gumbel::key(i as u64, 3 + i as u64), if i % 3 == 0 { 0.6 } else { 1.0 })).collect();
    let got: Vec<u32> = gumbel::sample(&logits, &rows).unwrap().to_vec1().unwrap();
    let host: Vec<u32> = gumbel::sample(&logits.to_device(&Device::Cpu).unwrap(), &rows).unwrap().to_vec1().unwrap();
    assert_eq!(got, host, "device and host draws");
    for i in [0usize, 17, 63] {
        let one: Vec<u32> = gumbel::sample(&logits.narrow(0, i, 1).unwrap(), &rows[i..i + 1]).unwrap().to_vec1().unwrap();
        assert_eq!(one, vec![got[i]], "row {i} alone");
    }
    // bf16 logits are drawn from their f32 values
    let lb = logits.to_dtype(DType::BF16).unwrap();
    let got_b: Vec<u32> = gumbel::sample(&lb, &rows).unwrap().to_vec1().unwrap();
    let host_b: Vec<u32> = gumbel::sample(&lb.to_device(&Device::Cpu).unwrap(), &rows).unwrap().to_vec1().unwrap();
    assert_eq!(got_b, host_b);
}

#[test]
fn matmul_rows_are_batch_invariant() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        // small launches take the thin (bf16, K % 16 = 0: up to 16 rows) or skinny
        // kernels, 1000 rows of the wider shapes the big-tile ones: a row's bits must not depend
        // on which
        for &(n, k) in &[(96usize, 64usize), (96, 48), (512, 1024), (8, 777), (151_936 / 64, 128), (2048, 512)] {
            let w = randn(&[n, k], 1, &dev).to_dtype(dtype).unwrap();
            let x = randn(&[1000, k], 2, &dev).to_dtype(dtype).unwrap();
            let all = invariant::matmul_nt(&x, &w).unwrap();
            for &m in &[1usize, 3, 16, 17, 64, 65, 129] {
                let part = invariant::matmul_nt(&x.narrow(0, 1000 - m, m).unwrap(), &w).unwrap();
                assert_eq!(bits(&part), bits(&all.narrow(0, 1000 - m, m).unwrap()), "{dtype:?} n {n} k {k}: last {m} rows");
            }
            // within rounding of the CPU kernel (f32 inputs there)
            if dtype == DType::F32 {
                let cpu = invariant::matmul_nt(&x.to_device(&Device::Cpu).unwrap(), &w.to_device(&Device::Cpu).unwrap()).unwrap();
                let r = max_rel(&all, &cpu);
                assert!(r < 1e-5, "f32 n {n} k {k}: GPU vs CPU {r:e}");
            } else {
                let exact = x.to_dtype(DType::F32).unwrap().matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
                let r = max_rel(&all, &exact);
                assert!(r < 1e-2, "bf16 n {n} k {k}: vs f32 product {r:e}");
            }
        }
    }
}

/// The tensor-core kernel (`inv_matmul_nt_bf16_tc`, 128 x 128 tiles) takes launches whose
/// 64 x 64 grid would fill the GPU: 17,000 rows reach it for a narrow N and K = 48, 80 (K % 32 =
/// 16: the extra zero step) too; a row's bits equal the thin and skinny kernels'.
#[test]
fn tensor_core_matmul_rows_equal_the_few_row_kernels() {
    let dev = gpu();
    for &(n, k) in &[(8usize, 48usize), (97, 80), (300, 64)] {
        let w = randn(&[n, k], 7, &dev).to_dtype(DType::BF16).unwrap();
        let x = randn(&[17_000, k], 8, &dev).to_dtype(DType::BF16).unwrap();
        let all = invariant::matmul_nt(&x, &w).unwrap();
        for &m in &[1usize, 16, 17, 129] {
            let part = invariant::matmul_nt(&x.narrow(0, 17_000 - m, m).unwrap(), &w).unwrap();
            assert_eq!(bits(&part), bits(&all.narrow(0, 17_000 - m, m).unwrap()), "n {n} k {k}: last {m} rows");
        }
    }
    // the engine's q, k, v projections in one launch (thin_l to 256 rows here, tensor cores beyond)
    let ws: Vec<Tensor> = [(256usize, 9u64), (64, 10), (96, 11)].iter().map(|&(n, s)| randn(&[n, 2048], s, &dev).to_dtype(DType::BF16).unwrap()).collect();
    for &m in &[1usize, 9, 16, 17, 64, 300] {
        let x = randn(&[m, 2048], 12, &dev).to_dtype(DType::BF16).unwrap();
        let three = invariant::matmul_nt3(&x, [&ws[0], &ws[1], &ws[2]]).unwrap().expect("the fused projections apply");
        three.iter().zip(&ws).for_each(|(y, w)| assert_eq!(bits(y), bits(&invariant::matmul_nt(&x, w).unwrap()), "fused projections, {m} rows"));
    }
}

#[test]
fn attention_rows_are_batch_invariant() {
    use lockstep_model::nn::varlen::{self, KeyLayout};
    let dev = gpu();
    // two sequences packed, the second longer than the old kernel's 12,256-key limit
    let (h, g, dh) = (8usize, 4usize, 128usize);
    let lens = [300usize, 20_000];
    let t: usize = lens.iter().sum();
    for dtype in [DType::F32, DType::BF16] {
        let q = randn(&[t, h, dh], 3, &dev).to_dtype(dtype).unwrap();
        let k = randn(&[t, g, dh], 4, &dev).to_dtype(dtype).unwrap();
        let v = randn(&[t, g, dh], 5, &dev).to_dtype(dtype).unwrap();
        let scale = 1.0 / (dh as f32).sqrt();
        let runs = [(0usize, lens[0]), (lens[0], lens[1])];
        let full = varlen::attention(&q, &k, &v, Arc::new(KeyLayout::packed(&runs, |i, _| i + 1).unwrap()), scale).unwrap();
        if dtype == DType::BF16 {
            // the tensor-core kernel (bf16 P) against the f32 kernel on the same rounded inputs
            let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let exact = varlen::attention(&f(&q), &f(&k), &f(&v), Arc::new(KeyLayout::packed(&runs, |i, _| i + 1).unwrap()), scale).unwrap();
            let r = max_rel(&f(&full), &exact);
            assert!(r < 2e-2, "bf16 attention vs f32 {r:e}");
        }
        // query i of the second sequence alone over its first i + 1 keys, laid out as a paged
        // pool: the same keys in blocks of 16 in reverse block order
        let bs = 16;
        let nb = lens[1].div_ceil(bs);
        let (k2, v2) = (k.narrow(0, lens[0], lens[1]).unwrap(), v.narrow(0, lens[0], lens[1]).unwrap());
        let pad = nb * bs - lens[1];
        let padded = |x: &Tensor| Tensor::cat(&[x, &Tensor::zeros((pad, g, dh), dtype, &dev).unwrap()], 0).unwrap();
        // block b of the sequence stored at pool block nb - 1 - b
        let rev = |x: &Tensor| {
            let x = padded(x);
            let blocks: Vec<Tensor> = (0..nb).rev().map(|b| x.narrow(0, b * bs, bs).unwrap()).collect();
            Tensor::cat(&blocks, 0).unwrap()
        };
        let (kp, vp) = (rev(&k2), rev(&v2));
        let table: Vec<u32> = (0..nb as u32).rev().collect();
        for &i in &[0usize, 1, 127, 128, 129, 5000, 12_300, lens[1] - 1] {
            let qi = q.narrow(0, lens[0] + i, 1).unwrap();
            let lay = Arc::new(KeyLayout::new(table.clone(), vec![0], vec![i as u32 + 1], bs, nb * bs).unwrap());
            let one = varlen::attention(&qi, &kp, &vp, lay, scale).unwrap();
            assert_eq!(bits(&one), bits(&full.narrow(0, lens[0] + i, 1).unwrap()), "{dtype:?} query {i}");
        }
        if dtype == DType::F32 {
            let cpu = |x: &Tensor| x.narrow(0, 0, lens[0]).unwrap().to_device(&Device::Cpu).unwrap();
            let c = varlen::attention(&cpu(&q), &cpu(&k), &cpu(&v), Arc::new(KeyLayout::packed(&runs[..1], |i, _| i + 1).unwrap()), scale).unwrap();
            let r = max_rel(&full.narrow(0, 0, lens[0]).unwrap(), &c);
            assert!(r < 1e-5, "attention GPU vs CPU {r:e}");
        }
    }
}

/// The tensor-core backward (bf16, `flash_bwd_*`) against the f32 reference backward (candle
/// ops per sequence) on the same rounded inputs: causal packed sequences of awkward lengths and
/// a bidirectional one, GQA (8 heads per kv head) and plain, head dims 128 and 64.
#[test]
fn flash_backward_matches_the_f32_reference() {
    use lockstep_model::nn::varlen::{self, KeyLayout};
    let dev = gpu();
    let lens = [1usize, 77, 300, 700];
    let t: usize = lens.iter().sum();
    let mut runs = Vec::new();
    let mut at = 0;
    for &l in &lens {
        runs.push((at, l));
        at += l;
    }
    for (h, g, dh, causal) in [(32usize, 4usize, 128usize, true), (4, 4, 64, true), (8, 2, 128, false)] {
        let layout = || Arc::new(KeyLayout::packed(&runs, |i, len| if causal { i + 1 } else { len }).unwrap());
        let scale = 1.0 / (dh as f32).sqrt();
        let bf = |x: Tensor| x.to_dtype(DType::BF16).unwrap();
        let (q, k, v) = (bf(randn(&[t, h, dh], 11, &dev)), bf(randn(&[t, g, dh], 12, &dev)), bf(randn(&[t, g, dh], 13, &dev)));
        let w = randn(&[t, h, dh], 14, &dev);
        let grads = |dtype: DType| {
            let var = |x: &Tensor| candle_core::Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let (qv, kv, vv) = (var(&q), var(&k), var(&v));
            let out = varlen::attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), layout(), scale).unwrap();
            let loss = (out.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap();
            let gs = loss.backward().unwrap();
            [&qv, &kv, &vv].map(|x| gs.get(x.as_tensor()).expect("a gradient").to_dtype(DType::F32).unwrap())
        };
        let (fast, exact) = (grads(DType::BF16), grads(DType::F32));
        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(fast.iter().zip(&exact)) {
            let r = max_rel(a, b);
            println!("flash backward H {h} G {g} Dh {dh} causal {causal}: {name} vs f32 {r:.3e}");
            assert!(r < 3e-2, "H {h} G {g} Dh {dh} causal {causal}: {name} vs f32 reference {r:e}");
        }
    }
}

fn seqs(n: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..n).map(|s| (0..(5 + (s * 7) % 23)).map(|i| ((i * 31 + s * 17 + 3) as u32) % vocab).collect()).collect()
}

fn wide_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 1024,
        "intermediate_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true}"#,
        "wide",
    )
    .unwrap()
}

fn models(dtype: DType) -> Vec<(&'static str, MoeCausalLm)> {
    let dev = gpu();
    let mut d = MoeCausalLm::embedded_default(0, dtype, &dev).unwrap();
    d.set_kernels(Kernels::Invariant);
    let mut w = MoeCausalLm::random(&wide_config(), 1, dtype, &dev).unwrap();
    w.set_kernels(Kernels::Invariant);
    vec![("default", d), ("wide", w)]
}

/// alone == packed with the others == padded batch, logits and layer routes
fn assert_batch_invariant(name: &str, model: &MoeCausalLm, n: usize) {
    let dev = model.device().clone();
    let s = seqs(n, model.cfg.vocab_size as u32);
    let tokens: Vec<u32> = s.concat();
    let mut cu = vec![0usize];
    for x in &s {
        cu.push(cu.last().unwrap() + x.len());
    }
    let packed = model.forward(&Batch::packed(&tokens, None, &cu, &dev).unwrap(), &RoutingPlan::record()).unwrap();
    let padded_batch = Batch::from_sequences(&s, 0, &dev).unwrap();
    let padded = model.forward(&padded_batch, &RoutingPlan::record()).unwrap();
    let k = model.cfg.moe.router.top_k;
    for (i, x) in s.iter().enumerate() {
        let alone = model.forward(&Batch::from_sequences(&[x.clone()], 0, &dev).unwrap(), &RoutingPlan::record()).unwrap();
        let a = bits(&alone.logits.i(0).unwrap());
        assert_eq!(a, bits(&packed.logits.i((0, cu[i]..cu[i + 1])).unwrap()), "{name} sequence {i}: alone vs packed");
        assert_eq!(a, bits(&padded.logits.i((i, 0..x.len())).unwrap()), "{name} sequence {i}: alone vs padded");
        for (l, r) in &alone.routes {
            let ids: Vec<u32> = r.expert_A.to_vec1().unwrap();
            let p: Vec<u32> = packed.routes[l].expert_A.to_vec1().unwrap();
            assert_eq!(ids, p[cu[i] * k..cu[i + 1] * k].to_vec(), "{name} sequence {i} layer {l}: routes");
            assert_eq!(bits(&r.prob_A), bits(&packed.routes[l].prob_A.narrow(0, cu[i] * k, x.len() * k).unwrap()));
        }
    }
}

#[test]
fn models_are_batch_invariant_on_the_gpu() {
    for dtype in [DType::F32, DType::BF16] {
        for (name, m) in models(dtype) {
            assert_batch_invariant(&format!("{name} {dtype:?}"), &m, 12);
        }
    }
}

/// Prefill prompts, then decode a token per sequence per step through the KV cache: every
/// token's logits equal the full forward's bit for bit.
#[test]
fn kv_cached_decoding_equals_full_forward_on_the_gpu() {
    use lockstep_model::{KvPool, PagedSeq};
    for dtype in [DType::F32, DType::BF16] {
        for (name, model) in models(dtype) {
            let dev = model.device().clone();
            let s = seqs(4, model.cfg.vocab_size as u32);
            let prompt = [3usize, 1, 6, 2];
            let bs = 4;
            let per_seq = s.iter().map(|x| x.len().div_ceil(bs)).max().unwrap();
            let mut pool = KvPool::new(&model, per_seq * s.len(), bs).unwrap();
            let tables: Vec<Vec<u32>> = (0..s.len()).map(|i| (0..per_seq).rev().map(|b| (b * s.len() + i) as u32).collect()).collect();
            let mut done = vec![0usize; s.len()];
            let mut got: Vec<Vec<(usize, Vec<u32>)>> = vec![Vec::new(); s.len()];
            let mut first = true;
            loop {
                let active: Vec<usize> = (0..s.len()).filter(|&i| first || done[i] < s[i].len()).collect();
                if active.is_empty() {
                    break;
                }
                let (mut toks, mut pos, mut cu, mut seqs_) = (Vec::new(), Vec::new(), vec![0usize], Vec::new());
                for &i in &active {
                    let (from, to) = if first { (0, prompt[i]) } else { (done[i], done[i] + 1) };
                    toks.extend_from_slice(&s[i][from..to]);
                    pos.extend((from..to).map(|p| p as u32));
                    cu.push(cu.last().unwrap() + to - from);
                    seqs_.push(PagedSeq { blocks: &tables[i], cached: from });
                    done[i] = to;
                }
                let step = Batch::packed(&toks, Some(&pos), &cu, &dev).unwrap();
                let out = model.forward_paged(&step, &seqs_, &mut pool, &RoutingPlan::record()).unwrap();
                for (a, &i) in active.iter().enumerate() {
                    got[i].push((done[i] - 1, bits(&out.logits.i((0, a)).unwrap())));
                }
                first = false;
            }
            for (i, x) in s.iter().enumerate() {
                let full = model.forward(&Batch::from_sequences(&[x.clone()], 0, &dev).unwrap(), &RoutingPlan::record()).unwrap();
                for (p, g) in &got[i] {
                    assert_eq!(g, &bits(&full.logits.i((0, *p)).unwrap()), "{name} {dtype:?} sequence {i} position {p}");
                }
            }
        }
    }
}

fn requests(n: usize, vocab: u32) -> Vec<Request> {
    (0..n)
        .map(|i| Request {
            prompt: (0..(1 + (i * 7) % 29)).map(|j| ((i * 37 + j * 11 + 1) as u32) % vocab).collect(),
            params: SamplingParams { seed: i as u64, max_tokens: 8, ..SamplingParams::default() },
        })
        .collect()
}

/// The headline on the GPU: the engine's log-probabilities and routes equal the trainer's
/// re-score of the same completions bit for bit (candle's cuBLAS kernels do not; printed beside).
#[test]
fn engine_equals_trainer_on_the_gpu() {
    for dtype in [DType::F32, DType::BF16] {
        for (name, base) in models(dtype) {
            for routing in ["token", "expert"] {
                let mut m = base.clone();
                if routing == "expert" {
                    let ec = RoutingStrategy::ExpertChoice { capacity_factor: 1.0, pool: "block:1".parse::<Pool>().unwrap() };
                    m.set_routing(ec, AttentionMode::Causal, true).unwrap();
                }
                let reqs = requests(16, m.cfg.vocab_size as u32);
                let done = Engine::new(m.clone()).generate(reqs.clone()).unwrap();
                let r = rescore(&m, &done).unwrap();
                let mut std_m = m.clone();
                std_m.set_kernels(Kernels::Autograd);
                let s = rescore(&std_m, &Engine::new(std_m.clone()).generate(reqs).unwrap()).unwrap();
                println!(
                    "{name} {dtype:?} {routing} choice: invariant max |Δ logprob| {:.3e}, routes {:.2}%; standard kernels {:.3e}, routes {:.2}%",
                    r.max_abs_logprob_diff,
                    100.0 * r.route_agreement,
                    s.max_abs_logprob_diff,
                    100.0 * s.route_agreement
                );
                assert!(r.completion_tokens > 0);
                assert_eq!(r.max_abs_logprob_diff, 0.0, "{name} {dtype:?} {routing}: engine vs trainer log-probs");
                assert_eq!(r.route_agreement, 1.0, "{name} {dtype:?} {routing}: routes");
                assert_eq!(r.prob_rows_differing, 0, "{name} {dtype:?} {routing}: router probabilities");
            }
        }
    }
}

/// The invariant forward carries the same gradients as candle's kernels, to rounding.
#[test]
fn invariant_gradients_match_standard_kernels() {
    let dev = gpu();
    let mut m = MoeCausalLm::embedded_default(3, DType::F32, &dev).unwrap();
    // every parameter a variable, so that backward reaches it
    m.map_params(|_, t| Ok(candle_core::Var::from_tensor(t)?.as_tensor().clone())).unwrap();
    let s = seqs(6, m.cfg.vocab_size as u32);
    let batch = Batch::from_sequences(&s, 0, &dev).unwrap();
    let grads = |m: &MoeCausalLm| {
        let out = m.forward(&batch, &RoutingPlan::record()).unwrap();
        let loss = out.logits.sqr().unwrap().mean_all().unwrap();
        let g = loss.backward().unwrap();
        m.named_params().unwrap().into_iter().map(|(n, p)| (n, g.get(&p).cloned())).collect::<Vec<_>>()
    };
    m.set_kernels(Kernels::Autograd);
    let a = grads(&m);
    m.set_kernels(Kernels::Invariant);
    let b = grads(&m);
    let mut worst = (0f32, String::new());
    for ((n, ga), (_, gb)) in a.iter().zip(&b) {
        match (ga, gb) {
            (Some(ga), Some(gb)) => {
                let r = max_rel(gb, ga);
                if r > worst.0 {
                    worst = (r, n.clone());
                }
            }
            (None, None) => {}
            _ => panic!("{n}: a gradient on one side only"),
        }
    }
    println!("invariant vs standard gradients: worst {:.3e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-4, "worst gradient {} {:e}", worst.1, worst.0);
}

/// The checksum of every parameter (f64 sum of its values): equal sums for equal bits, and a
/// changed bit changes it in practice — without copying billions of weights to the host.
fn param_sums(t: &lockstep_trainer::trainer::Trainer) -> Vec<u64> {
    t.params.iter().map(|(_, v)| v.as_tensor().to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().to_bits()).collect()
}

/// At the Qwen3-30B-A3B width (8 layers, 5.6B parameters, bf16 with f32 master weights): the
/// trainer's π_old scoring (the staged forward, LM head in chunks) equals the engine's log-probs
/// bit for bit, and a step with activation checkpointing updates the weights bitwise as a step
/// without it.
#[test]
fn trainer_equals_engine_at_the_30b_width_in_bf16() {
    use lockstep_trace::pack::{pack, PackConfig, Sample};
    use lockstep_trainer::trainer::{TrainBatch, Trainer, TrainerConfig};
    let dev = gpu();
    // the repository's copy beside the sources, else (a binary built from a snapshot elsewhere,
    // run from the repository root on the GPU machine) the working directory's
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/configs/qwen3_30b_a3b.json");
    let text = std::fs::read_to_string(built).or_else(|_| std::fs::read_to_string("testdata/configs/qwen3_30b_a3b.json")).unwrap();
    let mut cfg = ModelConfig::from_json_str(&text, "qwen3_30b_a3b.json").unwrap();
    // 8 layers need ~120 GB (two trainers' states one after the other): an H200; 2 on smaller GPUs
    let total = lockstep_model::memory_info(&dev).unwrap().map_or(0, |(_, t)| t);
    let layers = if total >= 130_000_000_000 { 8 } else { 2 };
    cfg.num_layers = layers;
    cfg.moe_layers = (0..layers).collect();
    let mut base = MoeCausalLm::random_on_device(&cfg, 7, DType::BF16, &dev).unwrap();
    base.set_kernels(Kernels::Invariant);
    let tcfg = |checkpoint: bool| TrainerConfig { dtype: DType::BF16, activation_checkpointing: checkpoint, logits_chunk_tokens: 256, ..TrainerConfig::default() };
    let mut trainer = Trainer::new(base.clone(), tcfg(true)).unwrap();
    let mut engine = Engine::new(trainer.inference_model().unwrap());
    let vocab = cfg.vocab_size as u32;
    let reqs: Vec<Request> = (0..8)
        .map(|i| Request {
            prompt: (0..(40 + 9 * i)).map(|j| ((i * 7919 + j * 104_729 + 3) as u32) % vocab).collect(),
            params: SamplingParams { seed: i as u64, max_tokens: 24, ..SamplingParams::default() },
        })
        .collect();
    let done = engine.generate(reqs).unwrap();
    let samples: Vec<Sample> = done
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let seq = c.sequence();
            let p = c.prompt.len();
            let mut logprobs = vec![0f32; p];
            logprobs.extend_from_slice(&c.logprobs);
            Sample { loss_mask: (0..seq.len()).map(|t| t >= p).collect(), advantages: vec![if i % 2 == 0 { 1.0 } else { -1.0 }; seq.len()], logprobs, routes: c.routes.clone(), tokens: seq }
        })
        .collect();
    let mbs = pack(&samples, &PackConfig { token_budget: 2048, pad_to_multiple: 1, pad_token: 0 }).unwrap();
    let mut micro: Vec<TrainBatch> = mbs.iter().map(|mb| TrainBatch::from_micro_batch(mb, &dev).unwrap()).collect();
    let score = trainer.score(&mut micro).unwrap();
    println!("30B width, {layers} layers, bf16: {} completion tokens, trainer vs engine max |Δ logprob| {:.3e}", score.tokens, score.max_abs_logprob_diff);
    assert!(score.tokens > 100.0);
    assert_eq!(score.max_abs_logprob_diff, 0.0, "the trainer's bf16 log-probs are the engine's");
    drop(engine);
    let a = trainer.step(&micro).unwrap();
    let peak = lockstep_model::memory_peak(&dev, true).unwrap();
    println!("checkpointed step: loss {:.4e} grad norm {:.4e} peak {:?} GB; {}", a.loss, a.grad_norm, peak.map(|b| b as f64 / 1e9), trainer.memory_plan(2048));
    assert_eq!(a.max_abs_logprob_diff, 0.0);
    assert!(a.loss.is_finite() && a.grad_norm.is_finite() && a.grad_norm > 0.0);
    let after_checkpointed = param_sums(&trainer);
    drop(trainer);
    let mut plain = Trainer::new(base, tcfg(false)).unwrap();
    for tb in &mut micro {
        tb.old = None;
    }
    plain.score(&mut micro).unwrap();
    let b = plain.step(&micro).unwrap();
    let peak = lockstep_model::memory_peak(&dev, true).unwrap();
    println!("plain step: loss {:.4e} grad norm {:.4e} peak {:?} GB", b.loss, b.grad_norm, peak.map(|b| b as f64 / 1e9));
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
    assert_eq!(after_checkpointed, param_sums(&plain), "checkpointing changes no bit of the update");
}

/// The dispatch plan of a small batch (one launch, `moe_plan_small`, A ≤ 2048) and of a large
/// one (the seven-kernel path) group the rows the same way: the gather is the host's stable
/// counting sort by expert, the counts are the host's, and a token's combine gives the same
/// bits whether its route sits in a small batch or at the head of a large one.
#[test]
#[allow(non_snake_case)] // x_AD: A assignments, D hidden
fn small_and_large_dispatch_plans_agree() {
    let dev = gpu();
    let (e, k, d) = (128usize, 8usize, 16usize);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let big_n = 400usize; // 3200 assignments: the large path
    let experts: Vec<u32> = (0..big_n * k).map(|_| rng.random_range(0..e as u32)).collect();
    let x = randn(&[big_n, d], 12, &dev);
    let w: Vec<f32> = (0..big_n * k).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let mut outs = Vec::new();
    for n in [64usize, big_n] {
        let a = n * k;
        let tok: Vec<u32> = (0..a as u32).map(|i| i / k as u32).collect();
        let ex = &experts[..a];
        let groups = lockstep_model::gpu::RowGroups::new(
            &Tensor::from_vec(tok.clone(), a, &dev).unwrap(),
            &Tensor::from_vec(ex.to_vec(), a, &dev).unwrap(),
            n,
            e,
        )
        .unwrap();
        let mut want_counts = vec![0usize; e];
        for &x in ex {
            want_counts[x as usize] += 1;
        }
        assert_eq!(groups.counts().unwrap(), want_counts.as_slice(), "{n} tokens: counts");
        let xn = x.narrow(0, 0, n).unwrap();
        let x_AD = groups.gather(&xn).unwrap();
        let mut order: Vec<usize> = (0..a).collect();
        order.sort_by_key(|&i| ex[i]); // stable
        let want = xn.index_select(&Tensor::from_vec(order.iter().map(|&i| tok[i]).collect::<Vec<u32>>(), a, &dev).unwrap(), 0).unwrap();
        assert_eq!(bits(&x_AD), bits(&want), "{n} tokens: the gather is the stable sort by expert");
        let y = (x_AD * 2.0).unwrap();
        let out = groups.combine(&y, &Tensor::from_vec(w[..a].to_vec(), a, &dev).unwrap()).unwrap();
        outs.push(out);
    }
    assert_eq!(bits(&outs[0]), bits(&outs[1].narrow(0, 0, 64).unwrap()), "a token's combine: small plan = large plan");
}

/// The fused rotary embedding on CUDA (`gpu/rope.cu`), forward and backward, has the CPU op's
/// bits (which are the composed candle ops', `nn::rope`'s test), in f32 and bf16, with a partial
/// rotary dim too.
#[test]
fn rope_forward_and_backward_on_the_gpu_equal_the_cpu() {
    use candle_core::Var;
    use lockstep_model::nn::rope::Rope;
    let dev = gpu();
    for (dh, rd) in [(128usize, 128usize), (64, 32)] {
        for dtype in [DType::F32, DType::BF16] {
            let (b, n, t) = (2, 5, 37);
            let positions: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 53).collect();
            let x = Tensor::randn(0f32, 1.0, (b, n, t, dh), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let g = Tensor::randn(0f32, 1.0, (b, n, t, dh), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            // the tables made once on the CPU (cos / sin of a device may differ in the last bit)
            let host_tables = Rope::new(1_000_000.0, rd, &Device::Cpu).unwrap().tables(&positions, b, t, dtype).unwrap();
            let run = |d: &Device| {
                let tables = host_tables.to_device(d).unwrap();
                let xv = Var::from_tensor(&x.to_device(d).unwrap()).unwrap();
                let y = tables.apply(xv.as_tensor()).unwrap();
                let s = (y.to_dtype(DType::F32).unwrap() * g.to_device(d).unwrap().to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap();
                let dx = s.backward().unwrap().get(xv.as_tensor()).unwrap().clone();
                // the token-major op (the projections' layout) on the transposed x
                let xt = Var::from_tensor(&x.to_device(d).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()).unwrap();
                let yt = tables.apply_token_major(xt.as_tensor()).unwrap();
                let gt = g.to_device(d).unwrap().transpose(1, 2).unwrap().to_dtype(DType::F32).unwrap();
                let st = (yt.to_dtype(DType::F32).unwrap() * gt).unwrap().sum_all().unwrap();
                let dxt = st.backward().unwrap().get(xt.as_tensor()).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                (bits(&y), bits(&dx), bits(&yt.transpose(1, 2).unwrap().contiguous().unwrap()), bits(&dxt))
            };
            let (gy, gdx, gyt, gdxt) = run(&dev);
            let (cy, cdx, _, _) = run(&Device::Cpu);
            assert_eq!(gy, cy, "Dh {dh} R {rd} {dtype:?}: forward");
            assert_eq!(gdx, cdx, "Dh {dh} R {rd} {dtype:?}: backward");
            assert_eq!(gyt, cy, "Dh {dh} R {rd} {dtype:?}: token-major forward");
            assert_eq!(gdxt, cdx, "Dh {dh} R {rd} {dtype:?}: token-major backward");
        }
    }
}
