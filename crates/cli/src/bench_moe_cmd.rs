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
    use candle_core::{DType, Device, Tensor, Var};
    use lockstep_model::gpu::{experts_forward, GemmImpl};
    use lockstep_model::moe::{combine, dispatch::Dispatch, experts::Experts};
    use serde_json::json;

    use super::BenchMoeArgs;
    use crate::gpu_timer::median_min_ms as time;

    #[derive(Clone, Copy)]
    struct Shape {
        name: &'static str,
        t: usize,
        h: usize,
        f: usize,
        e: usize,
        k: usize,
    }

    fn shape(name: &str) -> anyhow::Result<Shape> {
        Ok(match name {
            "a" => Shape { name: "a", t: 4096, h: 1024, f: 768, e: 64, k: 8 },
            "b" => Shape { name: "b", t: 8192, h: 2048, f: 768, e: 128, k: 8 },
            "small" => Shape { name: "small", t: 256, h: 64, f: 32, e: 8, k: 2 },
            other => bail!("--shapes: unknown shape {other:?} (a, b, small)"),
        })
    }

    /// Weights, inputs and a softmax top-k routing (computed once, not timed).
    struct Layer {
        x: Var,
        gate_up: Var,
        down: Var,
        w_A: Var,
        token_A: Tensor,
        expert_A: Tensor,
        g: Tensor,
    }

    fn layer(s: Shape, t: usize, dtype: DType, dev: &Device) -> anyhow::Result<Layer> {
        let x = Tensor::randn(0f32, 1f32, (t, s.h), dev)?;
        let router = (Tensor::randn(0f32, 1f32, (s.e, s.h), dev)? * (1.0 / (s.h as f64).sqrt()))?;
        let logits = x.matmul(&router.t()?)?;
        let m = logits.max_keepdim(1)?;
        let p = logits.broadcast_sub(&m)?.exp()?;
        let p = p.broadcast_div(&p.sum_keepdim(1)?)?;
        let ids = p.arg_sort_last_dim(false)?.narrow(1, 0, s.k)?.contiguous()?;
        let w = p.gather(&ids, 1)?;
        let w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        let tok: Vec<u32> = (0..(t * s.k) as u32).map(|a| a / s.k as u32).collect();
        let token_A = Tensor::from_vec(tok, t * s.k, dev)?;
        let std = 0.02;
        Ok(Layer {
            x: Var::from_tensor(&x.to_dtype(dtype)?)?,
            gate_up: Var::from_tensor(&(Tensor::randn(0f32, 1f32, (s.e, 2 * s.f, s.h), dev)? * std)?.to_dtype(dtype)?)?,
            down: Var::from_tensor(&(Tensor::randn(0f32, 1f32, (s.e, s.h, s.f), dev)? * std)?.to_dtype(dtype)?)?,
            w_A: Var::from_tensor(&w.flatten_all()?)?,
            token_A,
            expert_A: ids.flatten_all()?,
            g: Tensor::randn(0f32, 1f32, (t, s.h), dev)?.to_dtype(dtype)?,
        })
    }

    /// forward (+ backward): output and, with backward, [dx, dgate_up, ddown, dw].
    fn step(l: &Layer, imp: GemmImpl, backward: bool) -> anyhow::Result<(Tensor, Vec<Tensor>)> {
        let out = experts_forward(l.x.as_tensor(), &l.token_A, &l.expert_A, l.w_A.as_tensor(), l.gate_up.as_tensor(), l.down.as_tensor(), imp)?;
        if !backward {
            return Ok((out, vec![]));
        }
        // out.backward(g), like PyTorch's y.backward(g): no loss reduction in the timed region
        let root = out.apply_op1(Seed(l.g.clone()))?;
        let grads = root.backward()?;
        let get = |v: &Var, what: &str| grads.get(v.as_tensor()).cloned().with_context(|| format!("no gradient for {what}"));
        let gs = vec![get(&l.x, "x")?, get(&l.gate_up, "gate_up")?, get(&l.down, "down")?, get(&l.w_A, "w")?];
        Ok((out, gs))
    }

    /// Identity whose backward hands `g` to its input: `root.backward()` then gives out the
    /// gradient g (candle seeds a non-scalar root with ones).
    struct Seed(Tensor);

    impl candle_core::CustomOp1 for Seed {
        fn name(&self) -> &'static str {
            "bench-seed"
        }
        fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            use candle_core::backend::BackendStorage;
            Ok((s.try_clone(l)?, l.shape().clone()))
        }
        fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use candle_core::backend::BackendStorage;
            Ok((s.try_clone(l)?, l.shape().clone()))
        }
        fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(self.0.clone()))
        }
    }

    /// The CPU-path stages (`moe::dispatch` / `moe::experts` / `moe::combine`, candle
    /// autograd) in f32 on the same device: the reference the CUDA ops are checked against.
    fn reference(l: &Layer) -> anyhow::Result<(Tensor, Vec<Tensor>)> {
        let f32v = |v: &Var| -> anyhow::Result<Var> { Ok(Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?) };
        let (x, gu, dn, w) = (f32v(&l.x)?, f32v(&l.gate_up)?, f32v(&l.down)?, f32v(&l.w_A)?);
        let experts = Experts::from_stacked(gu.as_tensor().clone(), dn.as_tensor().clone())?;
        let tok: Vec<u32> = l.token_A.to_vec1()?;
        let exp: Vec<u32> = l.expert_A.to_vec1()?;
        let dispatch = Dispatch::from_pairs(&tok, &exp, w.as_tensor(), experts.num_experts(), x.device())?;
        let y_AD = experts.forward(&dispatch.gather(x.as_tensor())?, &dispatch.counts)?;
        let out = combine::combine(&y_AD, &dispatch, x.dim(0)?)?;
        let loss = out.mul(&l.g.to_dtype(DType::F32)?)?.sum_all()?;
        let grads = loss.backward()?;
        let get = |v: &Var| grads.get(v.as_tensor()).cloned().context("reference gradient missing");
        Ok((out, vec![get(&x)?, get(&gu)?, get(&dn)?, get(&w)?]))
    }

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
        let dtype = match args.dtype.as_str() {
            "bf16" => DType::BF16,
            "f32" => DType::F32,
            other => bail!("--dtype {other}: expected bf16 or f32"),
        };
        let impls: Vec<(String, GemmImpl)> =
            args.impls.iter().map(|s| Ok((s.clone(), s.parse::<GemmImpl>().map_err(anyhow::Error::msg)?))).collect::<anyhow::Result<_>>()?;
        let shapes: Vec<Shape> = args.shapes.iter().map(|s| shape(s)).collect::<anyhow::Result<_>>()?;
        let mut records = Vec::new();
        println!("lockstep bench-moe on {}: {dtype:?}, median of {} after {} warm-up; TFLOP/s = 18·T·K·H·F / time", args.device, args.iters, args.warmup);
        for s in &shapes {
            let l = layer(*s, s.t, dtype, &dev)?;
            if args.check {
                let (ro, rg) = reference(&l)?;
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
                let ld = layer(*s, t, dtype, &dev)?;
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
