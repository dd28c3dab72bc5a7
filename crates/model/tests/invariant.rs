//! Batch-invariant kernels: a sequence's logits and routes are bit-for-bit the same alone, in a
//! packed row with 15 others, or in a padded batch of 16 — on the tiny default and at realistic
//! width (hidden 1024, expert width 768) — and the kernels still match transformers.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use lockstep_model::parity::run_reference;
use lockstep_model::{Batch, Kernels, ModelConfig, MoeCausalLm, RoutingPlan};

fn seqs(n: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..n).map(|s| (0..(5 + (s * 7) % 23)).map(|i| ((i * 31 + s * 17 + 3) as u32) % vocab).collect()).collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn assert_batch_invariant(model: &MoeCausalLm, n: usize) {
    let dev = Device::Cpu;
    let s = seqs(n, model.cfg.vocab_size as u32);
    let tokens: Vec<u32> = s.concat();
    let mut cu = vec![0usize];
    for x in &s {
        cu.push(cu.last().unwrap() + x.len());
    }
    let packed = model.forward(&Batch::packed(&tokens, None, &cu, &dev).unwrap(), &RoutingPlan::record()).unwrap();
    let padded_batch = Batch::from_sequences(&s, 0, &dev).unwrap();
    let padded = model.forward(&padded_batch, &RoutingPlan::record()).unwrap();
    let t = padded_batch.dims().1;
    for (i, x) in s.iter().enumerate() {
        let alone = model.forward(&Batch::from_sequences(std::slice::from_ref(x), 0, &dev).unwrap(), &RoutingPlan::record()).unwrap();
        let a = bits(&alone.logits.i(0).unwrap());
        assert_eq!(a, bits(&packed.logits.i((0, cu[i]..cu[i + 1])).unwrap()), "sequence {i}: alone vs packed");
        assert_eq!(a, bits(&padded.logits.i((i, 0..x.len())).unwrap()), "sequence {i}: alone vs padded");
        for (l, r) in &alone.routes {
            let ids: Vec<u32> = r.expert_A.to_vec1().unwrap();
            let k = r.top_k.unwrap();
            let p: Vec<u32> = packed.routes[l].expert_A.to_vec1().unwrap();
            assert_eq!(ids, p[cu[i] * k..cu[i + 1] * k].to_vec(), "sequence {i} layer {l}: routes");
            let q: Vec<u32> = padded.routes[l].expert_A.to_vec1().unwrap();
            assert_eq!(ids, q[i * t * k..(i * t + x.len()) * k].to_vec());
            let pa = bits(&r.prob_A);
            assert_eq!(pa, bits(&packed.routes[l].prob_A.narrow(0, cu[i] * k, x.len() * k).unwrap()));
        }
    }
}

#[test]
fn default_model_is_batch_invariant() {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    assert_batch_invariant(&m, 16);
}

/// hidden 1024, expert width 768, 2 MoE layers: where candle's gemm is not batch-invariant.
pub fn wide_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 1024,
        "intermediate_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true}"#,
        "wide",
    )
    .unwrap()
}

#[test]
fn wide_model_is_batch_invariant() {
    let mut m = MoeCausalLm::random(&wide_config(), 1, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    assert_batch_invariant(&m, 6);
}

#[test]
fn invariant_kernels_match_transformers() {
    for name in ["qwen3_moe_tiny", "qwen2_moe_tiny", "glm4_moe_tiny"] {
        let dir = common::fixture(name);
        let mut model = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        model.set_kernels(Kernels::Invariant);
        let r = run_reference(&model, &dir.join("reference.safetensors"), 1e-4).unwrap();
        for c in &r.checks {
            assert!(c.pass, "{name}: {} {} rel {:.3e}", c.case, c.quantity, c.max_rel);
        }
    }
}

/// Prefill a prompt, then decode one token at a time through the paged KV cache, several
/// sequences per step, their blocks scattered over the pool in no order (block size 3, tables
/// interleaved and reversed): every new token's logits and routes equal the full forward's bit
/// for bit.
fn assert_cached_equals_full(model: &MoeCausalLm) {
    use lockstep_model::{KvPool, PagedSeq};
    let dev = Device::Cpu;
    let s = seqs(4, model.cfg.vocab_size as u32);
    let prompt = [3usize, 1, 6, 2];
    let bs = 3;
    let per_seq = s.iter().map(|x| x.len().div_ceil(bs)).max().unwrap();
    let mut pool = KvPool::new(model, per_seq * s.len(), bs).unwrap();
    // sequence i owns blocks i, i + S, i + 2S, ... in reverse order
    let tables: Vec<Vec<u32>> = (0..s.len()).map(|i| (0..per_seq).rev().map(|b| (b * s.len() + i) as u32).collect()).collect();
    // step 0: all prompts; then one token per sequence per step while any is left
    let mut done = vec![0usize; s.len()];
    let mut got: Vec<Vec<(usize, Vec<u32>)>> = vec![Vec::new(); s.len()]; // per seq: (position, logits bits)
    let mut got_routes: Vec<Vec<u32>> = vec![Vec::new(); s.len()]; // layer-0 ids per token
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
        let k = model.cfg.moe.router.top_k;
        let l0 = model.cfg.moe_layers[0];
        let ids: Vec<u32> = out.routes[&l0].expert_A.to_vec1().unwrap();
        for (a, &i) in active.iter().enumerate() {
            got[i].push((done[i] - 1, bits(&out.logits.i((0, a)).unwrap())));
            for slot in cu[a]..cu[a + 1] {
                got_routes[i].extend_from_slice(&ids[slot * k..(slot + 1) * k]);
            }
        }
        first = false;
    }
    for (i, x) in s.iter().enumerate() {
        let full = model.forward(&Batch::from_sequences(std::slice::from_ref(x), 0, &dev).unwrap(), &RoutingPlan::record()).unwrap();
        assert_eq!(got[i].len(), x.len() - prompt[i] + 1);
        for (p, g) in &got[i] {
            assert_eq!(g, &bits(&full.logits.i((0, *p)).unwrap()), "sequence {i} position {p}");
        }
        let ids: Vec<u32> = full.routes[&model.cfg.moe_layers[0]].expert_A.to_vec1().unwrap();
        assert_eq!(got_routes[i], ids, "sequence {i}: routes");
    }
}

#[test]
fn kv_cached_decoding_equals_full_forward_bitwise() {
    let mut m = MoeCausalLm::embedded_default(4, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    assert_cached_equals_full(&m);
    let mut w = MoeCausalLm::random(&wide_config(), 2, DType::F32, &Device::Cpu).unwrap();
    w.set_kernels(Kernels::Invariant);
    assert_cached_equals_full(&w);
}
