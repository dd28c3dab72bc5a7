//! `lockstep bench-graph`: what a CUDA graph would give the engine's decode step (#20), measured
//! before the engine is built for it. For each batch size B, one decode step of B sequences of
//! `--context` cached tokens through `MoeCausalLm::forward_paged` (the engine's forward: paged
//! KV cache, batch-invariant kernels, routes recorded), timed
//!
//! - eager, as the engine runs it today: host enqueueing + device, wall time per step;
//! - as a captured CUDA graph replayed: the same step captured once on the device's stream
//!   (candle's content-keyed upload cache holds the step's small host uploads, so the capture
//!   bakes them) and launched `--iters` times.
//!
//! The graph replays one fixed step (same tokens, same positions, same KV slots): a probe of the
//! device time a graph-launched step takes and of whether candle / cudarc capture the forward at
//! all, not a decode loop. The captured step's outputs are left to the graph (their buffers are
//! never handed back to candle), so the probe leaks them by design; the process ends after it.
#![allow(non_snake_case)]

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchGraphArgs {
    /// A config.json (random weights on the device), e.g. testdata/configs/qwen3_30b_a3b.json.
    #[arg(long)]
    pub random: PathBuf,
    /// Override the config's layer count.
    #[arg(long)]
    pub num_layers: Option<usize>,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Comma-separated batch sizes (sequences decoding one token each).
    #[arg(long, default_value = "1,64")]
    pub batch: String,
    /// Cached tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Write the records as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: BenchGraphArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench-graph captures CUDA graphs: build with `--features cuda` (scripts/cuda/build.sh)")
}

#[cfg(feature = "cuda")]
pub fn run(args: BenchGraphArgs) -> anyhow::Result<()> {
    imp::run(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::time::Instant;

    use anyhow::{bail, Context};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;
    use lockstep_model::{Batch, KvPool, Kernels, ModelConfig, MoeCausalLm, PagedSeq, RoutingPlan};
    use serde_json::json;

    use super::BenchGraphArgs;

    const BLOCK: usize = 16;

    fn first_line(s: &str) -> &str {
        s.lines().next().unwrap_or("")
    }

    pub fn run(args: BenchGraphArgs) -> anyhow::Result<()> {
        let dev = crate::device::parse("cuda")?;
        let Device::Cuda(cd) = &dev else { bail!("bench-graph needs a CUDA device") };
        let dtype = lockstep_model::parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype {e}"))?;
        let text = std::fs::read_to_string(&args.random).with_context(|| format!("--random {}", args.random.display()))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--random {}", args.random.display()))?;
        if let Some(n) = args.num_layers {
            v["num_hidden_layers"] = json!(n);
        }
        let cfg = ModelConfig::from_json_str(&v.to_string(), &args.random.display().to_string())?;
        let mut model = MoeCausalLm::random_on_device(&cfg, 0, dtype, &dev)?;
        model.set_kernels(Kernels::Invariant);
        let batches: Vec<usize> = args.batch.split(',').map(|b| b.trim().parse::<usize>().with_context(|| format!("--batch `{b}`"))).collect::<anyhow::Result<_>>()?;
        let per_seq = (args.context + 1).div_ceil(BLOCK);
        let most = batches.iter().copied().max().unwrap_or(1);
        let mut pool = KvPool::new(&model, per_seq * most, BLOCK)?;
        let stream = cd.cuda_stream();
        let plan = RoutingPlan::record();
        let mut recs = Vec::new();
        for &b in &batches {
            let tables: Vec<Vec<u32>> = (0..b).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
            let seqs: Vec<PagedSeq> = tables.iter().map(|t| PagedSeq { blocks: t, cached: args.context }).collect();
            let tokens: Vec<u32> = (0..b as u32).map(|i| (i * 7919 + 13) % cfg.vocab_size as u32).collect();
            let positions = vec![args.context as u32; b];
            let cu: Vec<usize> = (0..=b).collect();
            let step = Batch::packed(&tokens, Some(positions.as_slice()), &cu, &dev)?;
            // eager, as the engine enqueues it
            for _ in 0..3 {
                drop(model.forward_paged(&step, &seqs, &mut pool, &plan)?);
            }
            stream.synchronize()?;
            let t0 = Instant::now();
            let mut host = 0f64;
            for _ in 0..args.iters {
                let h0 = Instant::now();
                let out = model.forward_paged(&step, &seqs, &mut pool, &plan)?;
                host += h0.elapsed().as_secs_f64();
                drop(out);
            }
            stream.synchronize()?;
            let eager_ms = t0.elapsed().as_secs_f64() * 1e3 / args.iters as f64;
            let enqueue_ms = host * 1e3 / args.iters as f64;
            // captured: warm the upload cache, then capture one step
            let guard = cd.enable_cuda_graph_htod_cache();
            drop(model.forward_paged(&step, &seqs, &mut pool, &plan)?);
            stream.synchronize()?;
            let c0 = Instant::now();
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let captured = model.forward_paged(&step, &seqs, &mut pool, &plan);
            let mut why = String::new();
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
            let out = match (captured, graph) {
                (Ok(out), Ok(Some(g))) => Some((out, g)),
                (Err(e), _) => {
                    why = format!("the forward failed under capture: {}", first_line(&e.to_string()));
                    None
                }
                (_, Err(e)) => {
                    why = format!("end_capture failed: {e}");
                    None
                }
                (_, Ok(None)) => {
                    why = "capture gave no graph".to_string();
                    None
                }
            };
            drop(guard);
            let Some((out, graph)) = out else {
                println!("batch {b:>4}: eager {eager_ms:8.3} ms/step (host enqueue {enqueue_ms:7.3}), graph: {why}");
                recs.push(json!({"batch": b, "eager_ms": eager_ms, "enqueue_ms": enqueue_ms, "graph": why}));
                continue;
            };
            let capture_ms = c0.elapsed().as_secs_f64() * 1e3;
            // the captured outputs' buffers belong to the graph (freed by its next launch)
            std::mem::forget(out);
            graph.upload()?;
            graph.launch()?;
            stream.synchronize()?;
            let t1 = Instant::now();
            for _ in 0..args.iters {
                graph.launch()?;
            }
            stream.synchronize()?;
            let graph_ms = t1.elapsed().as_secs_f64() * 1e3 / args.iters as f64;
            println!(
                "batch {b:>4}: eager {eager_ms:8.3} ms/step (host enqueue {enqueue_ms:7.3}), graph replay {graph_ms:8.3} ms/step, capture {capture_ms:.0} ms"
            );
            recs.push(json!({"batch": b, "eager_ms": eager_ms, "enqueue_ms": enqueue_ms, "graph_ms": graph_ms, "capture_ms": capture_ms}));
            drop(graph);
        }
        if let Some(p) = &args.json {
            let doc = json!({"layers": cfg.num_layers, "context": args.context, "dtype": args.dtype, "records": recs});
            std::fs::write(p, serde_json::to_string_pretty(&doc)?).with_context(|| format!("--json {}", p.display()))?;
        }
        Ok(())
    }
}
