//! `lockstep demo`: record a batch, replay the recording, print routing health per layer and
//! the max |difference| between recorded and replayed logits (must be exactly 0). Then show
//! what replay is for: routes recorded by the same weights run in bf16 (an inference engine's
//! numerics) differ from what the f32 trainer would pick freely; replay pins them back.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use lockstep_model::metrics::{layer_health, route_agreement};
use lockstep_model::parity::max_abs_diff;
use lockstep_model::config::AttentionMode;
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Checkpoint directory; the embedded default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seed of the default model's weights and of the demo prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences in the batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Longest sequence (the others are shorter: the batch is padded).
    #[arg(long, default_value_t = 32)]
    len: usize,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// token-choice (each token picks k experts) or expert-choice (each expert picks tokens).
    #[arg(long, default_value = "token-choice")]
    routing: String,
    /// Expert choice: C = ceil(F · pool tokens / experts).
    #[arg(long, default_value_t = 1.0)]
    capacity_factor: f64,
    /// Expert choice: where experts pick from: block:N, sequence or batch.
    #[arg(long, default_value = "sequence")]
    pool: String,
    /// Attention: causal, bidirectional or block:N (expert choice over a wide pool needs one of the
    /// latter two); the model's own when absent.
    #[arg(long)]
    attention: Option<String>,
    /// Expert choice with a pool wider than one token on a causal model leaks the future; allow it
    /// anyway (for experiments).
    #[arg(long)]
    allow_causal_pool: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.len == 0 {
        bail!("--batch and --len must be > 0");
    }
    let dev = crate::device::parse(&args.device)?;
    let model = match &args.model {
        Some(dir) => MoeCausalLm::load(dir, DType::F32, &dev).with_context(|| format!("loading {}", dir.display()))?,
        None => MoeCausalLm::embedded_default(args.seed, DType::F32, &dev)?,
    };
    let (mut model, strategy) = (model, crate::args::routing(&args.routing, args.capacity_factor, &args.pool)?);
    let attention = match &args.attention {
        Some(a) => a.parse::<AttentionMode>().map_err(|e| anyhow::anyhow!("--attention {e}"))?,
        None => model.cfg.attention.mode,
    };
    model.set_routing(strategy, attention, args.allow_causal_pool).context("--routing / --pool / --attention")?;
    let cfg = &model.cfg;
    println!(
        "model: {} ({:?}), {} layers, MoE layers {:?}, {} experts, top-{}, renorm {}",
        args.model.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded default".into()),
        cfg.architecture,
        cfg.num_layers,
        cfg.moe_layers,
        cfg.moe.router.num_experts,
        cfg.moe.router.top_k,
        cfg.moe.router.norm_topk_prob
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let seqs: Vec<Vec<u32>> = (0..args.batch)
        .map(|i| {
            let len = (args.len - (i * args.len) / (2 * args.batch)).max(1);
            (0..len).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect()
        })
        .collect();
    let batch = Batch::from_sequences(&seqs, 0, &dev)?;
    let real = batch.real_mask();
    println!("batch: {} sequences, lengths {:?}, padded to {}", seqs.len(), seqs.iter().map(Vec::len).collect::<Vec<_>>(), batch.dims().1);

    let rec = model.forward(&batch, &RoutingPlan::record())?;
    println!("routing: {:?}, attention {:?}", cfg.moe.router.strategy, cfg.attention.mode);
    println!(
        "\n{:>5} {:>7} {:>11} {:>8} {:>8} {:>9}  tokens per expert",
        "layer", "tokens", "confidence", "max_vio", "dropped", "experts/t"
    );
    for (l, route) in &rec.routes {
        let h = layer_health(route, &real, cfg.moe.router.score_function)?;
        println!(
            "{l:>5} {:>7} {:>11.4} {:>8.3} {:>7.1}% {:>9.2}  {:?}",
            h.tokens,
            h.confidence,
            h.max_vio,
            100.0 * h.dropped,
            h.mean_experts_per_token,
            h.load
        );
    }

    let given = model.forward(&batch, &RoutingPlan::replay(&rec.routes, false)?)?;
    let recompute = model.forward(&batch, &RoutingPlan::replay(&rec.routes, true)?)?;
    let d_given = max_abs_diff(&rec.logits, &given.logits)?;
    let d_recompute = max_abs_diff(&rec.logits, &recompute.logits)?;
    println!("\nrecord → replay (given weights):     max |Δ logits| = {d_given:e}");
    println!("record → replay (recomputed weights): max |Δ logits| = {d_recompute:e}");

    // An engine running the same weights in bf16 records routes; the f32 trainer replays them.
    let mut engine = match &args.model {
        Some(dir) => MoeCausalLm::load(dir, DType::BF16, &dev)?,
        None => MoeCausalLm::embedded_default(args.seed, DType::BF16, &dev)?,
    };
    engine.set_routing(strategy, attention, args.allow_causal_pool)?;
    let engine_rec = engine.forward(&batch, &RoutingPlan::record())?;
    let pinned = model.forward(&batch, &RoutingPlan::replay(&engine_rec.routes, true)?)?;
    println!("\nroutes recorded by a bf16 engine, seen by the f32 trainer:");
    for (l, engine_route) in &engine_rec.routes {
        let a_free = route_agreement(&rec.routes[l], engine_route, &real)?;
        let a_pinned = route_agreement(&pinned.routes[l], engine_route, &real)?;
        println!("  layer {l}: route agreement free {:.2}%, replayed {:.2}%", 100.0 * a_free, 100.0 * a_pinned);
    }
    if d_given != 0.0 || d_recompute != 0.0 {
        bail!("replay did not reproduce the recorded logits bit for bit");
    }
    println!("\nreplay reproduced the recording exactly.");
    Ok(())
}
