//! `lockstep bench-rl`: a fixed synthetic RL workload, timed by phase (`lockstep_rl::bench`
//! documents the step and the FLOP count): rollouts through the in-process engine, π_old
//! scoring (`Trainer::score`), forward + backward + optimizer (`Trainer::step`), weight sync.
//! Prints and writes (`--out`) rollout tokens/s, trainer tokens/s, MFU against `--peak-tflops`
//! (default 989: H200 dense BF16), the time split and peak memory; the first step is a warm-up
//! and left out of the means. `--trainer-dtype` is the trainer's compute dtype (f32 as
//! `lockstep train` by default; bf16 keeps f32 master weights and moments in AdamW),
//! `--dtype` the rollout engine's (the same dtype shares the trainer's weights, another is a
//! cast copy at every weight sync). `scripts/bench/train_torch.py` is the transformers peer on
//! the same micro-batches, `scripts/cuda/gpu_scale.sh` runs both.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::DType;
use lockstep_model::{Kernels, ModelConfig, MoeCausalLm};
use lockstep_rl::bench::{self, BenchConfig, PeakMemory, StepReport};
use lockstep_trainer::loss::{LossConfig, PiOld};
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{Trainer, TrainerConfig};
use serde_json::json;

/// The default peak: NVIDIA H200 SXM, dense BF16 tensor-core TFLOP/s (1979 with sparsity).
const H200_BF16_DENSE_TFLOPS: f64 = 989.0;

#[derive(clap::Args)]
pub struct BenchRlArgs {
    /// Checkpoint directory (or use `--random`).
    #[arg(long, conflicts_with = "random")]
    model: Option<PathBuf>,
    /// A config.json to build with random weights drawn on the device; the embedded default
    /// when neither is given.
    #[arg(long)]
    random: Option<PathBuf>,
    /// Override the --random config's layer count.
    #[arg(long)]
    num_layers: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The rollout engine's weights: bf16 or f32 (the trainer's dtype shares its weights,
    /// another is a cast copy at every weight sync).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// The trainer's compute dtype: f32, or bf16 with f32 master weights and AdamW moments.
    #[arg(long, default_value = "f32")]
    trainer_dtype: String,
    /// Recompute each layer's activations in the backward (the trainer's activation checkpointing).
    #[arg(long)]
    activation_checkpointing: bool,
    /// invariant (batch-invariant kernels on both sides, as `lockstep train`) or standard
    /// (candle's / cuBLAS: autograd kernels for the trainer, fused inference ones for the engine)
    #[arg(long, default_value = "invariant")]
    kernels: String,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated per sample (no stop tokens: every sample is this long).
    #[arg(long, default_value_t = 256)]
    gen_len: usize,
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Samples per prompt.
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Token budget of one micro-batch.
    #[arg(long, default_value_t = 8192)]
    micro_batch_tokens: usize,
    /// Updates per step (whole groups each).
    #[arg(long, default_value_t = 2)]
    mini_steps: usize,
    /// Steps (the first is a warm-up, left out of the means).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1e-6)]
    lr: f64,
    /// Time every trainer phase (the device synchronised at each phase's end: a little slower)
    /// and report the split per step.
    #[arg(long)]
    time_phases: bool,
    /// The engine's token budget per step.
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: usize,
    /// Peak TFLOP/s the MFU is taken against (default: H200 dense BF16).
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn build_model(args: &BenchRlArgs, dev: &candle_core::Device) -> anyhow::Result<(MoeCausalLm, String)> {
    if args.num_layers.is_some() && args.random.is_none() {
        bail!("--num-layers applies to --random only");
    }
    Ok(match (&args.model, &args.random) {
        (Some(dir), _) => (MoeCausalLm::load(dir, DType::F32, dev).with_context(|| format!("--model {}", dir.display()))?, format!("checkpoint {}", dir.display())),
        (None, Some(cfg)) => {
            let text = std::fs::read_to_string(cfg).with_context(|| format!("--random {}", cfg.display()))?;
            let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--random {}", cfg.display()))?;
            if let Some(n) = args.num_layers {
                if n == 0 {
                    bail!("--num-layers must be > 0");
                }
                v["num_hidden_layers"] = json!(n);
            }
            let c = ModelConfig::from_json_str(&v.to_string(), &cfg.display().to_string())?;
            (MoeCausalLm::random_on_device(&c, args.seed, DType::F32, dev)?, format!("random {}", cfg.display()))
        }
        (None, None) => (MoeCausalLm::embedded_default(args.seed, DType::F32, dev)?, "embedded default".into()),
    })
}

fn check_flags(args: &BenchRlArgs) -> anyhow::Result<()> {
    for (flag, v) in [("--prompt-len", args.prompt_len), ("--gen-len", args.gen_len), ("--prompts", args.prompts), ("--group", args.group), ("--mini-steps", args.mini_steps), ("--steps", args.steps), ("--max-batched-tokens", args.max_batched_tokens)] {
        if v == 0 {
            bail!("{flag} must be > 0");
        }
    }
    if args.micro_batch_tokens < args.prompt_len + args.gen_len {
        bail!("--micro-batch-tokens {}: a sequence (--prompt-len + --gen-len = {}) must fit one micro-batch", args.micro_batch_tokens, args.prompt_len + args.gen_len);
    }
    if args.mini_steps > args.prompts {
        bail!("--mini-steps {} > --prompts {}: every update takes whole groups", args.mini_steps, args.prompts);
    }
    if !(args.temperature > 0.0 && args.temperature.is_finite()) {
        bail!("--temperature {}: must be > 0", args.temperature);
    }
    if let Some(p) = args.peak_tflops {
        if !(p > 0.0 && p.is_finite()) {
            bail!("--peak-tflops {p}: must be > 0");
        }
    }
    Ok(())
}

fn step_json(r: &StepReport) -> serde_json::Value {
    json!({
        "step": r.step, "warmup": r.step == 1,
        "rollout_s": r.rollout_s, "pi_old_score_s": r.pi_old_score_s, "train_step_s": r.train_step_s, "weight_sync_s": r.weight_sync_s,
        "rollout_tokens": r.rollout_tokens, "trainer_tokens": r.trainer_tokens, "train_flops": r.train_flops,
        "train_peak_memory_gb": r.train_peak_bytes.map(|b| b as f64 / 1e9), "trainer_phases_s": &r.phases,
        "rollout_tokens_per_s": r.rollout_tokens as f64 / r.rollout_s.max(1e-12),
        "trainer_tokens_per_s": r.trainer_tokens as f64 / r.train_step_s.max(1e-12),
        "loss": r.loss, "grad_norm": r.grad_norm, "reward_mean": r.reward_mean,
        "peak_memory_gb": r.peak_memory_bytes as f64 / 1e9,
    })
}

pub fn run(args: BenchRlArgs) -> anyhow::Result<()> {
    check_flags(&args)?;
    let dev = crate::device::parse(&args.device)?;
    let engine_dtype = crate::args::dtype(&args.dtype)?;
    let trainer_dtype = lockstep_model::parse_dtype(&args.trainer_dtype).map_err(|e| anyhow::anyhow!("--trainer-dtype {e}"))?;
    let (trainer_kernels, engine_kernels) = match args.kernels.as_str() {
        "invariant" => (Kernels::Invariant, Kernels::Invariant),
        "standard" => (Kernels::Autograd, Kernels::Inference),
        other => bail!("--kernels `{other}`: expected invariant or standard"),
    };
    let (peak_tflops, peak_source) = match args.peak_tflops {
        Some(p) => (p, "--peak-tflops".to_string()),
        None => (H200_BF16_DENSE_TFLOPS, "default: NVIDIA H200 SXM dense BF16 tensor cores (989 TFLOP/s)".to_string()),
    };
    let t0 = Instant::now();
    let (mut model, source) = build_model(&args, &dev)?;
    model.set_kernels(trainer_kernels);
    let mcfg = model.cfg.clone();
    let params: usize = lockstep_model::checkpoint::tensor_specs(&mcfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let seq_len = args.prompt_len + args.gen_len;
    let active = bench::active_matmul_params(&mcfg, seq_len);
    eprintln!(
        "model: {source}: {} layers, {:.2}B parameters ({:.2}B active matmul weights per token), trainer {trainer_dtype:?}{}, engine {engine_dtype:?}, {:?} kernels, built in {:.1} s",
        mcfg.num_layers,
        params as f64 / 1e9,
        active / 1e9,
        if args.activation_checkpointing { " (activation checkpointing)" } else { "" },
        trainer_kernels,
        t0.elapsed().as_secs_f64()
    );
    let tcfg = TrainerConfig {
        loss: LossConfig { pi_old: PiOld::Recompute, ..LossConfig::default() },
        optimizer: AdamWConfig { lr: args.lr, ..AdamWConfig::default() },
        replay: true,
        temperature: f64::from(args.temperature),
        dtype: trainer_dtype,
        activation_checkpointing: args.activation_checkpointing,
        time_phases: args.time_phases,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(model, tcfg)?;
    let plan = trainer.memory_plan(args.micro_batch_tokens);
    println!("{plan}");
    let cfg = BenchConfig {
        prompts: args.prompts,
        group: args.group,
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        micro_batch_tokens: args.micro_batch_tokens,
        mini_steps: args.mini_steps,
        steps: args.steps,
        seed: args.seed,
        temperature: args.temperature,
        engine_dtype,
        engine_kernels,
        max_batched_tokens: args.max_batched_tokens,
    };
    println!("{:>4} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>8} {:>8}", "step", "rollout s", "pi_old s", "train s", "sync s", "rollout t/s", "train t/s", "MFU", "peak GB");
    let steps = bench::run(&mut trainer, &cfg, &mut |r| {
        let mfu = r.train_flops / r.train_step_s.max(1e-12) / 1e12 / peak_tflops;
        println!(
            "{:>4} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>12.1} {:>12.1} {:>7.2}% {:>8.2}{}",
            r.step,
            r.rollout_s,
            r.pi_old_score_s,
            r.train_step_s,
            r.weight_sync_s,
            r.rollout_tokens as f64 / r.rollout_s.max(1e-12),
            r.trainer_tokens as f64 / r.train_step_s.max(1e-12),
            mfu * 100.0,
            r.peak_memory_bytes as f64 / 1e9,
            if r.step == 1 { "  (warm-up, not averaged)" } else { "" }
        );
        if let Some(b) = r.train_peak_bytes {
            println!("     trainer peak (scoring + updates) {:.2} GB against the plan's {:.2} GB", b as f64 / 1e9, plan.total() as f64 / 1e9);
        }
        if !r.phases.is_empty() {
            let split: Vec<String> = r.phases.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
            println!("     trainer phases (s): {}", split.join(", "));
        }
    })?;
    let mut peak = PeakMemory { bytes: steps.last().map_or(0, |r| r.peak_memory_bytes), ..PeakMemory::default() };
    let optimizer_probe_s = bench::optimizer_probe(&mut trainer)?;
    peak.sample(&dev)?;
    let s = bench::summarize(&steps, optimizer_probe_s, peak_tflops);
    println!(
        "mean of steps {:?}: rollout {:.1} tok/s, trainer {:.1} tok/s (fwd+bwd+optimizer), {:.2} TFLOP/s = MFU {:.2}% of {peak_tflops} TFLOP/s ({peak_source})",
        s.averaged_steps,
        s.rollout_tokens_per_s,
        s.trainer_tokens_per_s,
        s.train_tflops_per_s,
        s.mfu * 100.0
    );
    println!(
        "time per step: rollout {:.3} s, pi_old scoring {:.3} s, fwd+bwd {:.3} s, optimizer {:.3} s, weight sync {:.3} s; peak memory {:.2} GB",
        s.rollout_s,
        s.pi_old_score_s,
        s.fwd_bwd_s,
        s.optimizer_s,
        s.weight_sync_s,
        peak.bytes as f64 / 1e9
    );
    if let Some(p) = &args.out {
        let first = steps.first();
        let result = json!({
            "bench": "bench-rl",
            "model": {
                "source": source, "architecture": mcfg.architecture.hf_name(), "layers": mcfg.num_layers, "moe_layers": mcfg.moe_layers.len(),
                "parameters": params, "active_matmul_params_per_token": active,
                "trainer_dtype": if trainer_dtype == DType::F32 { "f32" } else { "bf16 compute, f32 master weights and AdamW moments" },
                "activation_checkpointing": args.activation_checkpointing,
                "engine_dtype": args.dtype, "kernels": args.kernels, "device": args.device,
            },
            "workload": {
                "prompts": args.prompts, "group": args.group, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "seq_len": seq_len,
                "sequences_per_step": args.prompts * args.group, "micro_batch_tokens": args.micro_batch_tokens, "mini_steps": args.mini_steps,
                "steps": args.steps, "temperature": args.temperature, "lr": args.lr, "seed": args.seed, "ignore_eos": true,
                "loss": "PPO (clip 0.2 / 0.28), pi_old recomputed (Trainer::score), routes replayed, AdamW",
                "reward": "share of even token ids in the completion; GRPO advantages",
            },
            "micro_batches": first.map(|r| r.micro_batches.clone()).unwrap_or_default(),
            "flops": {
                "formula": "per token 6 * N_act + per layer 6 * (2 * c * d_attn): N_act = matmul weights a token passes (q,k,v,o; router; its k experts; shared experts; dense MLPs; LM head), d_attn = heads * head_dim, c = keys the token attends to (t + 1 causal, T bidirectional); model FLOPs, no recomputation",
                "train_flops_per_step": first.map_or(0.0, |r| r.train_flops),
                "peak_tflops": peak_tflops, "peak_tflops_source": peak_source,
            },
            "warmup_steps_excluded": usize::from(steps.len() > 1), "averaged_steps": s.averaged_steps,
            "rollout_tokens_per_s": s.rollout_tokens_per_s,
            "trainer_tokens_per_s": s.trainer_tokens_per_s,
            "train_tflops_per_s": s.train_tflops_per_s,
            "mfu": s.mfu,
            "time_split_s": {
                "rollout": s.rollout_s, "pi_old_score": s.pi_old_score_s, "fwd_bwd": s.fwd_bwd_s, "optimizer": s.optimizer_s,
                "weight_sync": s.weight_sync_s, "step": s.step_s,
            },
            "train_step_s": s.train_step_s,
            "optimizer_probe_s": optimizer_probe_s,
            "optimizer_note": "Trainer::step is one call: one AdamW update of every parameter is timed separately after the run (zero gradients) and fwd_bwd = train_step - updates per step x that",
            "peak_memory_gb": peak.bytes as f64 / 1e9,
            "memory_plan": {
                "text": plan.to_string(), "total_gb": plan.total() as f64 / 1e9, "states_gb": plan.states() as f64 / 1e9,
                "activations_gb": plan.activations() as f64 / 1e9, "head_chunk_gb": plan.head_chunk as f64 / 1e9,
                "bytes_per_parameter_states": plan.states() as f64 / plan.parameters.max(1) as f64,
            },
            "peak_memory_source": peak.source,
            "steps": steps.iter().map(step_json).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&result)? + "\n").with_context(|| format!("--out {}", p.display()))?;
    }
    Ok(())
}
