//! `lockstep bench-serve`: the rollout engine's serving speed, in process (the engine the server
//! and the RL loop drive, without HTTP): fixed prompt and output lengths, `ignore_eos`, a sweep
//! of concurrencies, route capture on and off. Per run: output tokens/s, time per output token
//! (p50 / p99 over requests), time to first token (p50 / p99), mean step time, preemptions,
//! peak device memory. `--random config.json` draws the weights on the device (a full-size
//! model needs no checkpoint on disk). `scripts/bench/serve_torch.py` is the transformers peer
//! and `scripts/cuda/gpu_serve.sh` runs both in one device call.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use lockstep_engine::{Engine, Request, Sampler, SamplingParams};
use lockstep_model::{Kernels, ModelConfig, MoeCausalLm};
use serde_json::json;

#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// Checkpoint directory (or use `--random`).
    #[arg(long, conflicts_with = "random")]
    model: Option<PathBuf>,
    /// A config.json to build with random weights drawn on the device (e.g.
    /// testdata/configs/qwen3_30b_a3b.json); the embedded default when neither is given.
    #[arg(long)]
    random: Option<PathBuf>,
    /// Override the config's layer count (a shallower model of the same width).
    #[arg(long)]
    num_layers: Option<usize>,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// invariant (batch-invariant kernels, the default: engine = trainer bit for bit) or
    /// standard (candle's / cuBLAS)
    #[arg(long, default_value = "invariant")]
    kernels: String,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    output_len: usize,
    /// Comma-separated concurrencies.
    #[arg(long, default_value = "1,64,256")]
    concurrency: String,
    /// on, off or both (route capture)
    #[arg(long, default_value = "both")]
    capture: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Blocks in the KV pool (default: sized from memory).
    #[arg(long)]
    num_blocks: Option<usize>,
    #[arg(long, default_value_t = 0.85)]
    gpu_memory_fraction: f64,
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How temperature samples are drawn: gumbel (on the device; the CUDA default) or exact
    /// (the logits rows to the host; the CPU default).
    #[arg(long)]
    sampler: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: BenchServeArgs) -> anyhow::Result<()> {
    let dev = crate::device::parse(&args.device)?;
    let dtype = lockstep_model::parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype {e}"))?;
    let kernels = match args.kernels.as_str() {
        "invariant" => Kernels::Invariant,
        "standard" => Kernels::Inference,
        other => bail!("--kernels `{other}`: expected invariant or standard"),
    };
    let conc: Vec<usize> = args.concurrency.split(',').map(|c| c.trim().parse::<usize>().with_context(|| format!("--concurrency `{c}`"))).collect::<anyhow::Result<_>>()?;
    if conc.contains(&0) || args.prompt_len == 0 || args.output_len == 0 {
        bail!("--concurrency, --prompt-len and --output-len must be > 0");
    }
    let captures: Vec<bool> = match args.capture.as_str() {
        "on" => vec![true],
        "off" => vec![false],
        "both" => vec![true, false],
        other => bail!("--capture `{other}`: expected on, off or both"),
    };
    let t0 = Instant::now();
    let mut model = match (&args.model, &args.random) {
        (Some(dir), _) => MoeCausalLm::load(dir, dtype, &dev).with_context(|| format!("--model {}", dir.display()))?,
        (None, Some(cfg)) => {
            let text = std::fs::read_to_string(cfg).with_context(|| format!("--random {}", cfg.display()))?;
            let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--random {}", cfg.display()))?;
            if let Some(n) = args.num_layers {
                v["num_hidden_layers"] = json!(n);
            }
            let c = ModelConfig::from_json_str(&v.to_string(), &cfg.display().to_string())?;
            MoeCausalLm::random_on_device(&c, args.seed, dtype, &dev)?
        }
        (None, None) => MoeCausalLm::embedded_default(args.seed, dtype, &dev)?,
    };
    model.set_kernels(kernels);
    let params: usize = lockstep_model::checkpoint::tensor_specs(&model.cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    eprintln!("model: {} layers, {:.2}B parameters, {dtype:?}, {kernels:?}, built in {:.1} s", model.cfg.num_layers, params as f64 / 1e9, t0.elapsed().as_secs_f64());
    let total_mem = lockstep_model::memory_info(&dev)?.map(|m| m.1);
    let vocab = model.cfg.vocab_size as u64;
    let mut engine = Engine::new(model);
    if let Some(s) = &args.sampler {
        engine.set_sampler(Sampler::parse(s).with_context(|| format!("--sampler `{s}`: expected gumbel or exact"))?)?;
    }
    let sampler = format!("{:?}", engine.sampler()).to_lowercase();
    engine.cache.num_blocks = args.num_blocks;
    engine.cache.gpu_memory_fraction = args.gpu_memory_fraction;
    engine.cache.max_batched_tokens = args.max_batched_tokens;
    engine.max_running = *conc.iter().max().unwrap_or(&1);
    let reqs = |n: usize, out: usize, salt: u64| -> Vec<Request> {
        (0..n as u64)
            .map(|r| Request {
                prompt: (0..args.prompt_len as u64).map(|i| ((i * 2_654_435_761 + (r + salt) * 40_503 + 17) % vocab) as u32).collect(),
                params: SamplingParams { temperature: args.temperature, max_tokens: out, seed: r, ..Default::default() },
            })
            .collect()
    };
    // warm-up: kernels loaded, the pool made
    engine.generate(reqs(2, 4, 1_000_000))?;
    let (blocks, _, _) = engine.cache_usage();
    eprintln!("kv pool: {blocks} blocks of {} tokens", engine.cache.block_size);
    let mut records = Vec::new();
    println!("{:>5} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7} {:>9}", "conc", "capture", "tok/s", "tpot p50", "tpot p99", "ttft p50", "ttft p99", "step ms", "preempt", "peak GB");
    for (ci, &c) in conc.iter().enumerate() {
        for &cap in &captures {
            engine.set_capture_routes(cap)?;
            let pre0 = engine.num_preemptions();
            let times0 = engine.step_times();
            let ids: Vec<u64> = reqs(c, args.output_len, 10_000 * (ci as u64 + 1) + u64::from(cap)).into_iter().map(|r| engine.submit(r)).collect::<Result<_, _>>()?;
            let start = Instant::now();
            let mut first = std::collections::HashMap::new();
            let mut last = std::collections::HashMap::new();
            let (mut steps, mut min_free) = (0usize, usize::MAX);
            let mut out_tokens = 0usize;
            while !engine.is_idle() {
                let done = engine.step()?;
                steps += 1;
                let now = start.elapsed().as_secs_f64();
                for s in engine.sampled() {
                    first.entry(s.id).or_insert(now);
                    last.insert(s.id, now);
                    out_tokens += 1;
                }
                drop(done);
                if let Some((free, _)) = lockstep_model::memory_info(engine.model().device())? {
                    min_free = min_free.min(free);
                }
            }
            let wall = start.elapsed().as_secs_f64();
            let mut ttft: Vec<f64> = ids.iter().filter_map(|i| first.get(i).copied()).collect();
            let mut tpot: Vec<f64> = ids.iter().filter_map(|i| Some((last.get(i)? - first.get(i)?) / (args.output_len.max(2) - 1) as f64)).collect();
            let t = engine.step_times();
            let per_step = |a: f64, b: f64| (a - b) / steps.max(1) as f64 * 1e3;
            let breakdown = json!({
                "schedule_ms": per_step(t.schedule_s, times0.schedule_s), "launch_ms": per_step(t.launch_s, times0.launch_s),
                "device_wait_ms": per_step(t.device_s, times0.device_s), "logits_ms": per_step(t.logits_s, times0.logits_s),
                "sample_ms": per_step(t.sample_s, times0.sample_s),
            });
            eprintln!("  step breakdown (ms per step): {breakdown}");
            let peak_gb = total_mem.map(|t| (t - min_free.min(t)) as f64 / 1e9);
            let rec = json!({
                "concurrency": c, "capture": cap, "prompt_len": args.prompt_len, "output_len": args.output_len,
                "output_tokens": out_tokens, "wall_s": wall, "output_tok_per_s": out_tokens as f64 / wall,
                "tpot_ms_p50": pct(&mut tpot, 0.5) * 1e3, "tpot_ms_p99": pct(&mut tpot, 0.99) * 1e3,
                "ttft_ms_p50": pct(&mut ttft, 0.5) * 1e3, "ttft_ms_p99": pct(&mut ttft, 0.99) * 1e3,
                "steps": steps, "step_ms_mean": wall / steps.max(1) as f64 * 1e3,
                "preemptions": engine.num_preemptions() - pre0, "peak_memory_gb": peak_gb,
                "dtype": args.dtype, "kernels": args.kernels, "temperature": args.temperature, "sampler": sampler, "step_breakdown": breakdown,
            });
            println!(
                "{c:>5} {:>7} {:>10.1} {:>10.2} {:>10.2} {:>10.1} {:>10.1} {:>9.2} {:>7} {:>9}",
                if cap { "on" } else { "off" },
                rec["output_tok_per_s"].as_f64().unwrap_or(0.0),
                rec["tpot_ms_p50"].as_f64().unwrap_or(0.0),
                rec["tpot_ms_p99"].as_f64().unwrap_or(0.0),
                rec["ttft_ms_p50"].as_f64().unwrap_or(0.0),
                rec["ttft_ms_p99"].as_f64().unwrap_or(0.0),
                rec["step_ms_mean"].as_f64().unwrap_or(0.0),
                rec["preemptions"],
                peak_gb.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into()),
            );
            records.push(rec);
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&records)?).with_context(|| format!("--json {}", p.display()))?;
    }
    Ok(())
}
