//! `lockstep bench-invariant`: what the batch-invariant CUDA kernels cost against candle's
//! (cuBLAS) at decode and training sizes, timed with CUDA events (median of `--iters` after
//! `--warmup`):
//! - the matmul x [M, K] · wᵀ (w [N, K]) in f32 and bf16 at M = 1, 64, 256, 4096;
//! - causal attention (H 16 over 4 KV heads, Dh 128) at T = 512, 2048, 4096 (f32);
//! - the forward of the wide model (hidden 1024, 2 MoE layers) on 16 × 256 packed tokens.

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchInvariantArgs {
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Write the records as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: BenchInvariantArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench-invariant times the CUDA kernels: build with `--features cuda` (scripts/cuda/build.sh)")
}

#[cfg(feature = "cuda")]
pub fn run(args: BenchInvariantArgs) -> anyhow::Result<()> {
    imp::run(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use anyhow::{bail, Context};
    use candle_core::{DType, Device, Tensor, D};
    use lockstep_model::init::Preset;
    use lockstep_model::nn::{invariant, varlen};
    use lockstep_model::{Batch, Kernels, MoeCausalLm, RoutingPlan};
    use serde_json::json;

    use super::BenchInvariantArgs;

    fn time<F: FnMut() -> anyhow::Result<()>>(dev: &Device, warmup: usize, iters: usize, f: F) -> anyhow::Result<f64> {
        Ok(crate::gpu_timer::median_min_ms(dev, warmup, iters, f)?.0)
    }

    pub fn run(args: BenchInvariantArgs) -> anyhow::Result<()> {
        let dev = crate::device::parse(&args.device)?;
        if !dev.is_cuda() {
            bail!("--device {}: bench-invariant needs a CUDA device", args.device);
        }
        let (wu, it) = (args.warmup, args.iters);
        let mut records = Vec::new();
        println!("{:<34} {:>12} {:>12} {:>8}", "case", "invariant", "candle", "ratio");
        let line = |case: String, inv: f64, std: f64, flops: f64, records: &mut Vec<serde_json::Value>| {
            let tf = |ms: f64| if flops > 0.0 { format!(" ({:.1} TFLOP/s)", flops / ms / 1e9) } else { String::new() };
            println!("{case:<34} {inv:>9.3} ms {std:>9.3} ms {:>7.2}x   invariant{} candle{}", inv / std, tf(inv), tf(std));
            records.push(json!({"case": case, "invariant_ms": inv, "candle_ms": std, "flops": flops}));
        };

        // matmul
        for dtype in [DType::F32, DType::BF16] {
            for &(m, n, k) in &[(1usize, 2048usize, 2048usize), (64, 2048, 2048), (256, 2048, 2048), (4096, 2048, 2048), (4096, 1536, 1024)] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
                let inv = time(&dev, wu, it, || Ok(drop(invariant::matmul_nt(&x, &w)?)))?;
                let wt = w.t()?;
                let std = time(&dev, wu, it, || Ok(drop(x.matmul(&wt)?)))?;
                line(format!("matmul {dtype:?} M{m} N{n} K{k}"), inv, std, 2.0 * (m * n * k) as f64, &mut records);
            }
        }

        // the experts' grouped product at decode sizes (Qwen3-30B-A3B experts: 128, gate_up
        // 1536 x 2048, down 2048 x 768), bf16: `rows` rows for each of `used` experts; the
        // weight bytes of the experts used against the time (HBM: ~4.8 TB/s on an H200)
        for &(used, rows) in &[(8usize, 1usize), (128, 4), (128, 16)] {
            for &(n, k) in &[(1536usize, 2048usize), (2048, 768)] {
                let e = 128usize;
                let mut counts = vec![0usize; e];
                for c in counts.iter_mut().take(used) {
                    *c = rows;
                }
                let a: usize = counts.iter().sum();
                let x = Tensor::randn(0f32, 1.0, (a, k), &dev)?.to_dtype(DType::BF16)?;
                let w = Tensor::randn(0f32, 1.0, (e, n, k), &dev)?.to_dtype(DType::BF16)?;
                let inv = time(&dev, wu, it, || Ok(drop(invariant::grouped_matmul_nt(&x, &w, &counts)?)))?;
                let bytes = (used * n * k * 2) as f64;
                println!("{:<34} {inv:>9.3} ms   {:.0} GB/s of expert weights", format!("grouped bf16 {used}x{rows} rows N{n} K{k}"), bytes / inv / 1e6);
                records.push(json!({"case": format!("grouped bf16 {used} experts x {rows} rows N{n} K{k}"), "invariant_ms": inv, "weight_GBps": bytes / inv / 1e6}));
            }
        }

        // causal attention, f32 (the variable-length kernel over one packed sequence)
        let (h, g, dh) = (16usize, 4usize, 128usize);
        for &t in &[512usize, 2048, 4096] {
            let q = Tensor::randn(0f32, 1.0, (t, h, dh), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (t, g, dh), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (t, g, dh), &dev)?;
            let lay = Arc::new(varlen::KeyLayout::packed(&[(0, t)], |i, _| i + 1)?);
            let scale = 1.0 / (dh as f32).sqrt();
            let inv = time(&dev, wu, it, || Ok(drop(varlen::attention(&q, &k, &v, lay.clone(), scale)?)))?;
            // candle: the grouped heads stacked along queries, one matmul each side, softmax
            let bias_v: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
            let bias = Tensor::from_vec(bias_v, (1, 1, 1, t, t), &dev)?;
            let r = h / g;
            let (qh, kh, vh) = (q.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, k.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, v.transpose(0, 1)?.contiguous()?.unsqueeze(0)?);
            let std = time(&dev, wu, it, || {
                let q4 = qh.reshape((1, g, r * t, dh))?;
                let s = (q4.matmul(&kh.t()?.contiguous()?)? * scale as f64)?.reshape((1, g, r, t, t))?.broadcast_add(&bias)?;
                let p = candle_nn::ops::softmax(&s, D::Minus1)?.reshape((1, g, r * t, t))?;
                Ok(drop(p.matmul(&vh)?))
            })?;
            line(format!("attention f32 T{t} H{h} G{g} Dh{dh}"), inv, std, 4.0 * (h * t * t * dh) as f64 / 2.0, &mut records);
        }

        // decode attention, bf16, Qwen3-30B-A3B heads (32 over 4 KV heads, Dh 128): one query per
        // sequence over its L cached keys in 16-token blocks (the engine's decode step per layer)
        for &(seqs, l) in &[(1usize, 640usize), (64, 640), (256, 640)] {
            let (h, g, dh, bs) = (32usize, 4usize, 128usize, 16usize);
            let blocks = l.div_ceil(bs);
            let q = Tensor::randn(0f32, 1.0, (seqs, h, dh), &dev)?.to_dtype(DType::BF16)?;
            let pool_k = Tensor::randn(0f32, 1.0, (seqs * blocks * bs, g, dh), &dev)?.to_dtype(DType::BF16)?;
            let pool_v = Tensor::randn(0f32, 1.0, (seqs * blocks * bs, g, dh), &dev)?.to_dtype(DType::BF16)?;
            let table: Vec<u32> = (0..(seqs * blocks) as u32).collect();
            let start: Vec<u32> = (0..seqs).map(|s| (s * blocks) as u32).collect();
            let lay = Arc::new(varlen::KeyLayout::new(table, start, vec![l as u32; seqs], bs, seqs * blocks * bs)?);
            let scale = 1.0 / (dh as f32).sqrt();
            let inv = time(&dev, wu, it, || Ok(drop(varlen::attention(&q, &pool_k, &pool_v, lay.clone(), scale)?)))?;
            let bytes = (seqs * l * g * dh * 2 * 2) as f64;
            println!("{:<34} {inv:>9.3} ms   {:.0} GB/s of keys + values", format!("decode attention bf16 {seqs} x {l} keys"), bytes / inv / 1e6);
            records.push(json!({"case": format!("decode attention bf16 {seqs} seqs x {l} keys H{h} G{g} Dh{dh}"), "invariant_ms": inv, "kv_GBps": bytes / inv / 1e6}));
        }

        // a whole forward: the wide model on 16 × 256 packed tokens
        for dtype in [DType::F32, DType::BF16] {
            let cfg = Preset::Wide.config()?;
            let mut m = MoeCausalLm::random(&cfg, 0, dtype, &dev)?;
            let tokens: Vec<u32> = (0..16 * 256).map(|i| (i * 37 % 512) as u32).collect();
            let cu: Vec<usize> = (0..=16).map(|s| s * 256).collect();
            let batch = Batch::packed(&tokens, None, &cu, &dev)?;
            m.set_kernels(Kernels::Invariant);
            let inv = time(&dev, wu, it, || Ok(drop(m.forward(&batch, &RoutingPlan::record())?)))?;
            m.set_kernels(Kernels::Autograd);
            let std = time(&dev, wu, it, || Ok(drop(m.forward(&batch, &RoutingPlan::record())?)))?;
            line(format!("wide model forward {dtype:?} 16x256"), inv, std, 0.0, &mut records);
        }
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&records)?).with_context(|| format!("--json {}", p.display()))?;
        }
        Ok(())
    }
}
