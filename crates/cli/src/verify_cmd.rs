//! `lockstep verify`: run every case of a transformers reference dump against a checkpoint and
//! print a table of errors; non-zero exit beyond tolerance.

use std::path::PathBuf;

use anyhow::{bail, Context};
use lockstep_model::parity::{run_reference_with, Tolerance};
use lockstep_model::MoeCausalLm;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Reference file laid out like testdata/fixtures/*/reference.safetensors.
    #[arg(long)]
    reference: PathBuf,
    /// Largest allowed relative error max|ours − ref| / max|ref|.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Largest relative error of the free-routing cases (forward, perturbed); default
    /// --tolerance. In bf16 a flipped near-tie changes everything downstream of it.
    #[arg(long)]
    free_tolerance: Option<f64>,
    /// Weights and compute dtype of the model: f32 or bf16 (bf16 needs a looser --tolerance and
    /// --min-route-agreement; README "GPU" documents the measured ones).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Smallest fraction of tokens whose experts must equal the reference's.
    #[arg(long, default_value_t = 1.0)]
    min_route_agreement: f64,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also run a training reference laid out like testdata/fixtures/*/grads.safetensors (loss,
    /// token logprobs and every parameter's gradient under forced routes, perturbed routers).
    #[arg(long)]
    grads: Option<PathBuf>,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let dtype = crate::args::dtype(&args.dtype)?;
    if !(0.0..=1.0).contains(&args.min_route_agreement) {
        bail!("--min-route-agreement {}: expected a fraction in 0..=1", args.min_route_agreement);
    }
    let model = MoeCausalLm::load(&args.model, dtype, &crate::device::parse(&args.device)?)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tol = Tolerance {
        rel: args.tolerance,
        rel_free: args.free_tolerance.unwrap_or(args.tolerance),
        min_route_agreement: args.min_route_agreement,
    };
    let mut report = run_reference_with(&model, &args.reference, tol)?;
    if let Some(g) = &args.grads {
        report.checks.extend(lockstep_trainer::grads::run_grads_reference(&model, g, &args.reference, args.tolerance)?);
    }
    println!(
        "{} ({:?}, {} layers, MoE layers {:?}, {} experts, top-{})",
        args.model.display(),
        model.cfg.architecture,
        model.cfg.num_layers,
        model.cfg.moe_layers,
        model.cfg.moe.router.num_experts,
        model.cfg.moe.router.top_k
    );
    println!("{:<10} {:<58} {:>11} {:>11} {:>10}  result", "case", "quantity", "max abs", "max rel", "agreement");
    for c in &report.checks {
        let agree = c.agreement.map(|a| format!("{:.2}%", 100.0 * a)).unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:<58} {:>11.3e} {:>11.3e} {:>10}  {}",
            c.case,
            c.quantity,
            c.max_abs,
            c.max_rel,
            agree,
            if c.pass { "ok" } else { "FAIL" }
        );
    }
    let reference = report.reference_changed_routes.map(|r| r.to_string()).unwrap_or_else(|| "not stated".into());
    println!(
        "routes changed by the perturbation: {} of {} (reference: {reference})",
        report.changed_routes, report.total_routes
    );
    if !report.passed() {
        let failed: Vec<String> =
            report.checks.iter().filter(|c| !c.pass).map(|c| format!("{} {}", c.case, c.quantity)).collect();
        if failed.is_empty() {
            bail!("the replay case is vacuous or disagrees with the reference's count of changed routes");
        }
        bail!("{} check(s) beyond tolerance {:e}: {}", failed.len(), args.tolerance, failed.join(", "));
    }
    println!("all {} checks within {:e}", report.checks.len(), args.tolerance);
    Ok(())
}
