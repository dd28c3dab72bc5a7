//! `lockstep bench-moe`: one MoE expert layer (dispatch → gate_up → SwiGLU → down → combine)
#![allow(non_snake_case)] // shape-suffixed names (w_A, token_A) as in lockstep-model
//! forward + backward on the GPU through lockstep's CUDA ops, timed with CUDA events (median of
//! `--iters` after `--warmup`), beside `scripts/bench/moe_layer_torch.py` in the same device call
//! (`scripts/cuda/gpu_bench.sh`). Also forward-only at decode-like token counts, and a numeric
//! check of the bf16 path against an f32 reference (the CPU-path stages run on the GPU in f32).
//!
//! Useful FLOPs of fwd + bwd: 18·T·K·H·F (forward 6·T·K·H·F: gate_up 4, down 2; backward 2×).

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchMoeArgs {
    /// Shapes: a = (T 4096, H 1024, F 768, E 64, K 8); b = Qwen3-30B-A3B (T 8192, H 2048, F 768, E 128, K 8);
    /// small = (T 256, H 64, F 32, E 8, K 2).
    #[arg(long, value_delimiter = ',', default_value = "a,b")]
    pub shapes: Vec<String>,
    /// GEMM implementations to time: auto, grouped, padded, loop.
    #[arg(long, value_delimiter = ',', default_value = "auto,grouped,padded,loop")]
    pub impls: Vec<String>,
    /// bf16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Forward-only token counts (decode-like); 0 to skip.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub decode: Vec<usize>,
    /// Check every implementation against the f32 reference (shape by shape) before timing.
    #[arg(long)]
    pub check: bool,
    /// Write the records as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: BenchMoeArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench-moe times the CUDA MoE path: build with `--features cuda` (scripts/cuda/build.sh)")
}

#[cfg(feature = "cuda")]
pub fn run(args: BenchMoeArgs) -> anyhow::Result<()> {
    imp::run(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use anyhow::{bail, Context};
    use candle_core::{DType, Tensor};
    use lockstep_model::gpu::{experts_forward, GemmImpl};
    use lockstep_model::moe::synthetic::{LayerShape as Shape, SyntheticLayer as Layer};
    use serde_json::json;

    use super::BenchMoeArgs;
    use crate::gpu_timer::median_min_ms as time;

    /// forward (+ backward): output and, with backward, [dx, dgate_up, ddown, dw].
    fn step(l: &Layer, imp: GemmImpl, backward: bool) -> anyhow::Result<(Tensor, Vec<Tensor>)> {
        let out = experts_forward(l.x.as_tensor(), &l.token_A, &l.expert_A, l.w_A.as_tensor(), l.gate_up.as_tensor(), l.down.as_tensor(), imp)?;
        if !backward {
            return Ok((out, vec![]));
        }
        // out.backward(g), like PyTorch's y.backward(g): no loss reduction in the timed region
        let gs = l.grads(&out)?;
        Ok((out, gs))
    }

    /// max|a − b| / max|b| on the device, in f32.
    fn max_rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        let a = a.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(if scale > 0.0 { diff / scale } else { diff })
    }

    pub fn run(args: BenchMoeArgs) -> anyhow::Result<()> {
        let dev = crate::device::parse(&args.device)?;
        if !dev.is_cuda() {
            bail!("--device {}: bench-moe needs a CUDA device", args.device);
        }
        dev.set_seed(42)?;
        let dtype = crate::args::dtype(&args.dtype)?;
        let impls: Vec<(String, GemmImpl)> =
            args.impls.iter().map(|s| Ok((s.clone(), s.parse::<GemmImpl>().map_err(anyhow::Error::msg)?))).collect::<anyhow::Result<_>>()?;
        let shapes: Vec<Shape> =
            args.shapes.iter().map(|s| s.parse::<Shape>().map_err(|e| anyhow::anyhow!("--shapes {e}"))).collect::<anyhow::Result<_>>()?;
        let mut records = Vec::new();
        println!("lockstep bench-moe on {}: {dtype:?}, median of {} after {} warm-up; TFLOP/s = 18·T·K·H·F / time", args.device, args.iters, args.warmup);
        for s in &shapes {
            // weights, inputs and a softmax top-k routing (computed once, not timed)
            let l = Layer::new(*s, s.t, dtype, &dev)?;
            if args.check {
                // the CPU-path stages (`moe::reference_experts`) in f32 on the same device
                let (ro, rg) = l.reference()?;
                for (name, imp) in &impls {
                    let (o, g) = step(&l, *imp, true)?;
                    let errs: Vec<f32> = std::iter::once(max_rel(&o, &ro)).chain(g.iter().zip(&rg).map(|(a, b)| max_rel(a, b))).collect::<anyhow::Result<_>>()?;
                    println!(
                        "check shape {} {name:<8} max|Δ|/max|ref| vs f32 reference: out {:.2e}  dx {:.2e}  dgate_up {:.2e}  ddown {:.2e}  dw {:.2e}",
                        s.name, errs[0], errs[1], errs[2], errs[3], errs[4]
                    );
                    records.push(json!({"kind": "check", "shape": s.name, "impl": name, "dtype": args.dtype,
                        "out": errs[0], "dx": errs[1], "dgate_up": errs[2], "ddown": errs[3], "dw": errs[4]}));
                }
            }
            let flops = 18.0 * (s.t * s.k * s.h * s.f) as f64;
            for (name, imp) in &impls {
                let (med, min) = time(&dev, args.warmup, args.iters, || step(&l, *imp, true).map(|_| ()))?;
                let tf = flops / (med * 1e-3) / 1e12;
                println!("fwd+bwd shape {} (T {} H {} F {} E {} K {}) {name:<8} {med:8.3} ms (min {min:.3})  {tf:6.1} TFLOP/s", s.name, s.t, s.h, s.f, s.e, s.k);
                records.push(json!({"kind": "fwd_bwd", "shape": s.name, "T": s.t, "impl": name, "dtype": args.dtype, "ms_median": med, "ms_min": min, "tflops": tf}));
            }
            for &t in args.decode.iter().filter(|&&t| t > 0) {
                let ld = Layer::new(*s, t, dtype, &dev)?;
                let flops = 6.0 * (t * s.k * s.h * s.f) as f64;
                for (name, imp) in &impls {
                    let (med, min) = time(&dev, args.warmup, args.iters, || step(&ld, *imp, false).map(|_| ()))?;
                    let tf = flops / (med * 1e-3) / 1e12;
                    println!("forward shape {} T {t:<5} {name:<8} {med:8.3} ms (min {min:.3})  {tf:6.2} TFLOP/s", s.name);
                    records.push(json!({"kind": "forward", "shape": s.name, "T": t, "impl": name, "dtype": args.dtype, "ms_median": med, "ms_min": min, "tflops": tf}));
                }
            }
        }
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&records)?).with_context(|| format!("--json {}", p.display()))?;
        }
        Ok(())
    }
}
