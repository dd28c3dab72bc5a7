//! The speed cost of batch invariance: the embedded default's forward (prefill: B sequences of
//! 64 tokens, packed) and one decode step (B sequences, one new token each over a 64-token KV
//! cache) with the batch-invariant kernels vs candle's ordinary ones (`Autograd`: composed ops,
//! `Inference`: fused softmax / rms-norm), at batch 1 and 16, CPU f32, route recording off.
//! Then the same on a wider random model (hidden 1024, expert width 768, 2 MoE layers: the
//! `--width wide` of `lockstep consistency`), where matmuls dominate.
//! Run: `cargo bench -p lockstep-engine --bench invariance` (median and best of 31 runs after 3 warm-ups, tokens/s from the best;
//! 5 after 1 for the wide model).

use std::time::Instant;

use candle_core::{DType, Device};
use lockstep_model::{Batch, Kernels, KvPool, ModelConfig, MoeCausalLm, PagedSeq, RoutingPlan};

const WIDE: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 1024,
  "intermediate_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 2,
  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
  "rope_theta": 1000000.0, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true}"#;

/// (median, best) seconds; on a shared machine noise only adds time, so the ratios use the best.
fn time_secs(warm: usize, runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warm {
        f();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

fn packed(seqs: &[Vec<u32>], positions: Option<&[u32]>) -> Batch {
    let mut toks = Vec::new();
    let mut cu = vec![0usize];
    for s in seqs {
        toks.extend_from_slice(s);
        cu.push(toks.len());
    }
    Batch::packed(&toks, positions, &cu, &Device::Cpu).unwrap()
}

fn main() {
    let dev = Device::Cpu;
    let default = || MoeCausalLm::embedded_default(0, DType::F32, &dev).unwrap();
    let wide = || MoeCausalLm::random(&ModelConfig::from_json_str(WIDE, "wide").unwrap(), 0, DType::F32, &dev).unwrap();
    bench("embedded default", &default, (3, 31));
    bench("wide (hidden 1024)", &wide, (1, 5));
}

fn bench(name: &str, make: &dyn Fn() -> MoeCausalLm, (warm, runs): (usize, usize)) {
    let len = 64usize;
    println!("\n{name}, CPU f32, threads {}; prefill = B x {len} tokens packed, decode = B x 1 token over a {len}-token cache", candle_core::utils::get_num_threads());
    println!("{:<10} {:>5} {:>14} {:>20} {:>14} {:>20}", "kernels", "batch", "prefill tok/s", "ms/forward med/best", "decode tok/s", "ms/step med/best");
    let mut rows = Vec::new();
    for b in [1usize, 16] {
        let prompts: Vec<Vec<u32>> = (0..b).map(|r| (0..len).map(|i| ((i * 37 + r * 101 + 1) % 256) as u32).collect()).collect();
        let next: Vec<Vec<u32>> = (0..b).map(|r| vec![((r * 13 + 7) % 256) as u32]).collect();
        let prefill = packed(&prompts, None);
        let pos = vec![len as u32; b];
        let step = packed(&next, Some(&pos));
        for kernels in [Kernels::Autograd, Kernels::Inference, Kernels::Invariant] {
            let mut model = make();
            model.set_kernels(kernels);
            let plan = RoutingPlan::compute();
            let t_fwd = time_secs(warm, runs, || {
                model.forward(&prefill, &plan).unwrap();
            });
            // a pool holding the prompts (block size 16); each timed step writes the next token
            // into the same slots again
            let bs = 16;
            let per = (len + 1).div_ceil(bs);
            let mut pool = KvPool::new(&model, b * per, bs).unwrap();
            let tables: Vec<Vec<u32>> = (0..b).map(|r| ((r * per) as u32..((r + 1) * per) as u32).collect()).collect();
            let seqs = |cached: usize| -> Vec<PagedSeq> { tables.iter().map(|t| PagedSeq { blocks: t, cached }).collect() };
            model.forward_paged(&prefill, &seqs(0), &mut pool, &plan).unwrap();
            let t_dec = time_secs(warm, runs, || {
                model.forward_paged(&step, &seqs(len), &mut pool, &plan).unwrap();
            });
            println!(
                "{:<10} {b:>5} {:>14.0} {:>20} {:>14.0} {:>20}",
                format!("{kernels:?}"),
                (b * len) as f64 / t_fwd.1,
                format!("{:.2} / {:.2}", t_fwd.0 * 1e3, t_fwd.1 * 1e3),
                b as f64 / t_dec.1,
                format!("{:.3} / {:.3}", t_dec.0 * 1e3, t_dec.1 * 1e3),
            );
            rows.push((b, kernels, t_fwd.1, t_dec.1));
        }
    }
    println!("invariant vs ordinary (best-time ratio; > 1 = invariant slower)");
    for b in [1usize, 16] {
        let get = |k: Kernels| rows.iter().find(|r| r.0 == b && r.1 == k).map(|r| (r.2, r.3)).unwrap();
        let (inv, auto, inf) = (get(Kernels::Invariant), get(Kernels::Autograd), get(Kernels::Inference));
        println!(
            "batch {b:>2}: prefill {:.2}x Autograd, {:.2}x Inference; decode {:.2}x Autograd, {:.2}x Inference",
            inv.0 / auto.0,
            inv.0 / inf.0,
            inv.1 / auto.1,
            inv.1 / inf.1
        );
    }
}
