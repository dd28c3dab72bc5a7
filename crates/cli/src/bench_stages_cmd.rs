//! `lockstep bench-stages`: where a training micro-batch's time goes, stage by stage, at a
//! config's width (e.g. Qwen3-30B-A3B's; random weights drawn on the device), timed with CUDA
//! events (median of `--iters` after `--warmup`):
//! - one decoder layer's forward, and forward + backward (weights as `Var`s, the backward
//!   through a surrogate Σ y·g as the trainer's staged backward takes it);
//! - its MoE block alone (forward, forward + backward);
//! - the variable-length attention kernel alone on the layer's q / k / v shapes (forward,
//!   forward + backward);
//! - the LM head + log-softmax + gather on one chunk of positions, as the trainer runs it: the
//!   forward without a graph, then the backward (recomputed logits, the fused gradient);
//! - adding one layer's gradients into an f32 accumulator (the trainer's `GradAccumulator`).
//!
//! The micro-batch is `--seqs` sequences of `--seq-len` tokens packed in one row (the trainer's
//! layout). The rest of a layer (norms, projections, RoPE, residuals) is the layer's time less
//! the MoE block's and the attention kernel's.
#![allow(non_snake_case)] // shape-suffixed names (x_ND: N positions, D hidden) are the convention here

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchStagesArgs {
    /// A config.json (random weights on the device), e.g. testdata/configs/qwen3_30b_a3b.json.
    #[arg(long)]
    pub random: PathBuf,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// invariant (the default, the trainer's) or standard (candle's / cuBLAS)
    #[arg(long, default_value = "invariant")]
    pub kernels: String,
    #[arg(long, default_value_t = 21)]
    pub seqs: usize,
    #[arg(long, default_value_t = 768)]
    pub seq_len: usize,
    /// positions of one LM-head chunk
    #[arg(long, default_value_t = 1024)]
    pub chunk: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Write the records as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only the stages whose name contains one of these comma-separated words (e.g.
    /// `attention`, `moe`, `head`, `layer forward + backward`): for a kernel profile of one
    /// stage (`scripts/cuda/profile_stages.sh`). Default: every stage.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: BenchStagesArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench-stages times CUDA work: build with `--features cuda` (scripts/cuda/build.sh)")
}

#[cfg(feature = "cuda")]
pub fn run(args: BenchStagesArgs) -> anyhow::Result<()> {
    imp::run(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use anyhow::{bail, Context};
    use candle_core::{DType, Tensor, Var, D};
    use lockstep_model::nn::varlen;
    use lockstep_model::{Batch, Kernels, ModelConfig, MoeCausalLm, Recording, RouteMode, RoutingPlan};
    use lockstep_trainer::optim::GradAccumulator;
    use serde_json::json;

    use super::BenchStagesArgs;

    pub fn run(args: BenchStagesArgs) -> anyhow::Result<()> {
        let dev = crate::device::parse(&args.device)?;
        if !dev.is_cuda() {
            bail!("--device {}: bench-stages needs a CUDA device", args.device);
        }
        let dtype = lockstep_model::parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype {e}"))?;
        let kernels = match args.kernels.as_str() {
            "invariant" => Kernels::Invariant,
            "standard" => Kernels::Autograd,
            other => bail!("--kernels `{other}`: expected invariant or standard"),
        };
        let text = std::fs::read_to_string(&args.random).with_context(|| format!("--random {}", args.random.display()))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--random {}", args.random.display()))?;
        v["num_hidden_layers"] = json!(1);
        let cfg = ModelConfig::from_json_str(&v.to_string(), &args.random.display().to_string())?;
        let mut model = MoeCausalLm::random_on_device(&cfg, 0, dtype, &dev)?;
        model.set_kernels(kernels);
        // the weights as Vars (the trainer's)
        let mut params: Vec<(String, Var)> = Vec::new();
        model.map_params(|name, t| {
            let v = Var::from_tensor(t)?;
            params.push((name.to_string(), v.clone()));
            Ok(v.as_tensor().clone())
        })?;
        let (s, l) = (args.seqs, args.seq_len);
        let n = s * l;
        let vocab = cfg.vocab_size as u64;
        let tokens: Vec<u32> = (0..n as u64).map(|i| ((i * 2_654_435_761 + 17) % vocab) as u32).collect();
        let cu: Vec<usize> = (0..=s).map(|i| i * l).collect();
        let batch = Batch::packed(&tokens, None, &cu, &dev)?;
        let plan = RoutingPlan::record();
        let ctx = model.prepare(&batch, &plan)?;
        let d = cfg.hidden_size;
        let x = (Tensor::randn(0f32, 1.0, (1, n, d), &dev)?.to_dtype(dtype)?).detach();
        let g = (Tensor::randn(0f32, 1e-3, (1, n, d), &dev)?.to_dtype(dtype)?).detach();
        let (wu, it) = (args.warmup, args.iters);
        let only = args.only.clone();
        let wanted = move |stage: &str| only.is_empty() || only.iter().any(|w| stage.contains(w.as_str()));
        // a stage left out by --only is not run and reads 0 ms
        let time_stage = |stage: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            if !wanted(stage) {
                return Ok(0.0);
            }
            crate::gpu_timer::median_min_ms(&dev, wu, it, f).map(|t| t.0)
        };
        let surrogate = |y: &Tensor, g: &Tensor| -> candle_core::Result<Tensor> { (y * g)?.sum(D::Minus1)?.sum_all()?.to_dtype(DType::F32) };
        let mut rec: Vec<(String, f64)> = Vec::new();

        // one decoder layer
        let layer_fwd = time_stage("layer forward", &mut || {
            let mut r = Recording::new();
            drop(model.layer_forward(0, &x, &ctx, &plan, &batch, &mut r)?);
            Ok(())
        })?;
        rec.push(("layer forward".into(), layer_fwd));
        let mut last_grads = None;
        let layer_fb = time_stage("layer forward + backward", &mut || {
            let xv = Var::from_tensor(&x)?;
            let mut r = Recording::new();
            let y = model.layer_forward(0, xv.as_tensor(), &ctx, &plan, &batch, &mut r)?;
            last_grads = Some(surrogate(&y, &g)?.backward()?);
            Ok(())
        })?;
        rec.push(("layer forward + backward".into(), layer_fb));
        if let Some(grads) = last_grads {
            let mut acc = GradAccumulator::default();
            acc.add(&params, &grads)?;
            let accumulate = time_stage("accumulate one layer's gradients (f32)", &mut || Ok(acc.add(&params, &grads)?))?;
            rec.push(("accumulate one layer's gradients (f32)".into(), accumulate));
        }

        // the MoE block
        let block = model.moe_block(0).context("layer 0 is not an MoE layer")?;
        let x_ND = x.reshape((n, d))?;
        let g_ND = g.reshape((n, d))?;
        let moe_fwd = time_stage("moe block forward", &mut || Ok(drop(block.forward(&x_ND, &RouteMode::Record, 0, &batch)?)))?;
        rec.push(("moe block forward".into(), moe_fwd));
        let moe_fb = time_stage("moe block forward + backward", &mut || {
            let xv = Var::from_tensor(&x_ND)?;
            let (y, _) = block.forward(xv.as_tensor(), &RouteMode::Record, 0, &batch)?;
            drop(surrogate(&y, &g_ND)?.backward()?);
            Ok(())
        })?;
        rec.push(("moe block forward + backward".into(), moe_fb));

        // the attention kernel on the layer's shapes
        let a = &cfg.attention;
        let (h, kv, dh) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let q = Tensor::randn(0f32, 1.0, (n, h, dh), &dev)?.to_dtype(dtype)?;
        let k = Tensor::randn(0f32, 1.0, (n, kv, dh), &dev)?.to_dtype(dtype)?;
        let vv = Tensor::randn(0f32, 1.0, (n, kv, dh), &dev)?.to_dtype(dtype)?;
        let go = Tensor::randn(0f32, 1e-3, (n, h, dh), &dev)?.to_dtype(dtype)?;
        let runs: Vec<(usize, usize)> = (0..s).map(|i| (i * l, l)).collect();
        let lay = Arc::new(varlen::KeyLayout::packed(&runs, |i, _| i + 1)?);
        let scale = 1.0 / (dh as f32).sqrt();
        let att_fwd = time_stage("attention kernel forward", &mut || Ok(drop(varlen::attention(&q, &k, &vv, lay.clone(), scale)?)))?;
        rec.push(("attention kernel forward".into(), att_fwd));
        let att_fb = time_stage("attention kernel forward + backward", &mut || {
            let (qv, kv_, vv_) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&vv)?);
            let o = varlen::attention(qv.as_tensor(), kv_.as_tensor(), vv_.as_tensor(), lay.clone(), scale)?;
            drop(surrogate(&o, &go)?.backward()?);
            Ok(())
        })?;
        rec.push(("attention kernel forward + backward".into(), att_fb));
        // parts of the rest: the input norm, and the four attention projections (x [N, D] → q, k,
        // v; o from [N, H·Dh]), each forward + backward with the weights as Vars
        let layer = &model.layers[0];
        let norm_fb = time_stage("input RMSNorm forward + backward", &mut || {
            let xv = Var::from_tensor(&x)?;
            let y = candle_core::Module::forward(&layer.input_layernorm, xv.as_tensor())?;
            drop(surrogate(&y, &g)?.backward()?);
            Ok(())
        })?;
        rec.push(("input RMSNorm forward + backward".into(), norm_fb));
        let a = &layer.self_attn;
        let o_in = (Tensor::randn(0f32, 1.0, (1, n, a.o_proj.weight().dim(1)?), &dev)?.to_dtype(dtype)?).detach();
        let proj_fb = time_stage("q, k, v, o projections forward + backward", &mut || {
            let (xv, ov) = (Var::from_tensor(&x)?, Var::from_tensor(&o_in)?);
            let mut s = surrogate(&candle_core::Module::forward(&a.o_proj, ov.as_tensor())?, &g)?;
            for p in [&a.q_proj, &a.k_proj, &a.v_proj] {
                let y = candle_core::Module::forward(p, xv.as_tensor())?;
                s = (s + y.sum_all()?.to_dtype(DType::F32)?)?;
            }
            drop(s.backward()?);
            Ok(())
        })?;
        rec.push(("q, k, v, o projections forward + backward".into(), proj_fb));
        rec.push(("rest of the layer, forward (norms, projections, RoPE)".into(), layer_fwd - moe_fwd - att_fwd));
        rec.push(("rest of the layer, forward + backward".into(), layer_fb - moe_fb - att_fb));

        // the head on one chunk
        let c = args.chunk.min(n);
        let target = Tensor::from_vec(tokens[..c].to_vec(), c, &dev)?;
        // as the trainer runs it (`trainer::staged`): the forward without a graph (the engine's
        // log-prob arithmetic), then the backward: the logits recomputed with their graph and the
        // fused log-prob / entropy gradient (`lockstep_model::head_grad`)
        let head_f = time_stage("LM head chunk forward", &mut || {
            let logits = model.head_forward(&x_ND.narrow(0, 0, c)?)?;
            drop(lockstep_model::head_grad::token_stats(&logits, &target, 1.0)?);
            Ok(())
        })?;
        let target_host = &tokens[..c];
        let (g_lp, g_h) = (Tensor::ones(c, DType::F32, &dev)?, Tensor::ones(c, DType::F32, &dev)?);
        let head_b = time_stage("LM head chunk backward", &mut || {
            let xc = Var::from_tensor(&x_ND.narrow(0, 0, c)?)?;
            let logits = model.head_forward(xc.as_tensor())?;
            let s = lockstep_model::head_grad::logprob_entropy_surrogate(&logits, target_host, &g_lp, Some(&g_h), 1.0)?.sum_all()?;
            drop(s.backward()?);
            Ok(())
        })?;
        rec.push((format!("LM head chunk of {c}: forward (log-prob + entropy, no graph)"), head_f));
        rec.push((format!("LM head chunk of {c}: backward (recomputed logits, fused gradient)"), head_b));

        println!("{:<62} {:>10}", format!("stage ({s} x {l} tokens, {dtype:?}, {})", args.kernels), "ms");
        for (name, ms) in &rec {
            println!("{name:<62} {ms:>10.2}");
        }
        if let Some(p) = &args.json {
            let out: Vec<_> = rec.iter().map(|(k, v)| json!({"stage": k, "ms": v})).collect();
            let doc = json!({"seqs": s, "seq_len": l, "dtype": args.dtype, "kernels": args.kernels, "stages": out});
            std::fs::write(p, serde_json::to_string_pretty(&doc)?).with_context(|| format!("--json {}", p.display()))?;
        }
        Ok(())
    }
}
