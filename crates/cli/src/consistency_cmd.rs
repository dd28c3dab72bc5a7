//! `lockstep consistency`: generate a batch with mixed prompt lengths, re-score it the trainer's
//! way, print max |Δ logprob|, the KL estimate and route agreement — with the batch-invariant
//! kernels (lockstep) and, for comparison, candle's ordinary kernels. `--routing expert-choice
//! --pool block:1` checks expert choice (per token, so it generates token by token); wider pools
//! are refused by the engine (a token's experts would depend on later tokens).

use std::path::PathBuf;

use anyhow::{bail, Context};
use lockstep_engine::consistency::rescore;
use lockstep_engine::{Engine, Request, SamplingParams};
use lockstep_model::config::AttentionMode;
use lockstep_model::init::Preset;
use lockstep_model::{Kernels, MoeCausalLm};

#[derive(clap::Args)]
pub struct ConsistencyArgs {
    /// Checkpoint directory; the embedded default (or `--width wide`) when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// default: the embedded default; wide: random init, hidden 1024, expert width 768, 2 MoE layers.
    #[arg(long, default_value = "default")]
    width: String,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// token-choice or expert-choice; the model's own when absent.
    #[arg(long)]
    routing: Option<String>,
    /// Expert choice: C = ceil(F · pool tokens / experts).
    #[arg(long, default_value_t = 1.0)]
    capacity_factor: f64,
    /// Expert choice: where experts pick from. Only block:1 (one-token pools) can be generated
    /// token by token; block:N, sequence and batch are refused.
    #[arg(long, default_value = "block:1")]
    pool: String,
    /// cpu, cuda or cuda:N (CUDA needs the `cuda` build: scripts/cuda/build.sh).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16 (the invariant kernels take bf16 on CUDA only).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(args: ConsistencyArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.max_tokens == 0 {
        bail!("--batch and --max-tokens must be > 0");
    }
    let dev = crate::device::parse(&args.device)?;
    let dtype = crate::args::dtype(&args.dtype)?;
    let mut base = match &args.model {
        Some(dir) => MoeCausalLm::load(dir, dtype, &dev).with_context(|| format!("loading {}", dir.display()))?,
        None => args.width.parse::<Preset>().map_err(|e| anyhow::anyhow!("--width {e}"))?.model(args.seed, dtype, &dev)?,
    };
    if let Some(routing) = &args.routing {
        let strategy = crate::args::routing(routing, args.capacity_factor, &args.pool)?;
        // causal attention; a wide pool is let through here so the engine says why it cannot
        // generate it
        base.set_routing(strategy, AttentionMode::Causal, true).context("--routing / --pool / --capacity-factor")?;
    }
    base.check_incremental().context("the engine generates token by token")?;
    let r = &base.cfg.moe.router;
    println!(
        "routing: {:?}, {} experts, {} per token in the routes; {:?} {:?}",
        r.strategy,
        r.num_experts,
        lockstep_engine::engine::route_width(&base),
        dev.location(),
        dtype
    );
    let v = base.cfg.vocab_size as u32;
    let reqs: Vec<Request> = (0..args.batch)
        .map(|i| Request {
            prompt: (0..(1 + (i * 7) % 29)).map(|j| ((i * 37 + j * 11 + 1) as u32) % v).collect(),
            params: SamplingParams { seed: args.seed + i as u64, max_tokens: args.max_tokens, ..SamplingParams::default() },
        })
        .collect();
    println!("{:<10} {:>6} {:>8} {:>16} {:>12} {:>16} {:>14} {:>16}", "kernels", "seqs", "tokens", "max |Δ logprob|", "KL est.", "route agreement", "prob rows ≠", "generate+rescore");
    for (name, k) in [("invariant", Kernels::Invariant), ("standard", Kernels::Autograd)] {
        let mut m = base.clone();
        m.set_kernels(k);
        let t0 = std::time::Instant::now();
        let done = Engine::new(m.clone()).generate(reqs.clone())?;
        let r = rescore(&m, &done)?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{name:<10} {:>6} {:>8} {:>16.3e} {:>12.3e} {:>15.2}% {:>14} {:>15.2}s",
            r.sequences,
            r.completion_tokens,
            r.max_abs_logprob_diff,
            r.kl_estimate,
            100.0 * r.route_agreement,
            r.prob_rows_differing,
            secs
        );
    }
    Ok(())
}
