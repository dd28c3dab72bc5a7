//! `lockstep train`: the RL loop with routing replay on the embedded default (or a TOML config),
//! a progress bar, per-step metrics (JSONL), checkpoints and an HTML run report.

use std::path::PathBuf;

use anyhow::Context;
use lockstep_rl::{run, RunConfig, RunOptions};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run configuration (TOML); the embedded default when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// Run the same seed with replay off and on, and plot both in one report.
    #[arg(long)]
    compare_replay: bool,
    /// Continue from a checkpoint directory (`<out>/checkpoints/step-N`).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Override `steps`.
    #[arg(long)]
    steps: Option<u64>,
    /// Override `warmup.steps`.
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Override `output.dir`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run_cmd(args: TrainArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            RunConfig::from_toml(&text).with_context(|| format!("in {}", p.display()))?
        }
        None => RunConfig::default_config(),
    };
    if let Some(s) = args.steps {
        cfg.steps = s;
    }
    if let Some(s) = args.warmup_steps {
        cfg.warmup.steps = s;
    }
    if let Some(o) = &args.out {
        cfg.output.dir = o.display().to_string();
    }
    cfg.validate()?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let out = PathBuf::from(&cfg.output.dir);
    let opts = RunOptions { resume: args.resume.clone(), progress: !args.quiet };
    let t0 = std::time::Instant::now();
    if args.compare_replay {
        if args.resume.is_some() {
            anyhow::bail!("--compare-replay starts both runs from scratch; drop --resume");
        }
        let off = run(&cfg, &out.join("replay_off"), false, &opts)?;
        let on = run(&cfg, &out.join("replay_on"), true, &opts)?;
        lockstep_rl::report::write(
            &out.join("report.html"),
            &[("replay off".into(), off.records.clone()), ("replay on".into(), on.records.clone())],
            "lockstep train: replay off vs on",
        )?;
        for (name, s) in [("replay off", &off), ("replay on", &on)] {
            print_summary(name, s);
        }
        println!("report: {}", out.join("report.html").display());
    } else {
        let s = run(&cfg, &out, cfg.replay.enabled, &opts)?;
        print_summary(if cfg.replay.enabled { "replay on" } else { "replay off" }, &s);
        println!("metrics: {}\nreport: {}", out.join("metrics.jsonl").display(), out.join("report.html").display());
    }
    println!("wall time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn print_summary(name: &str, s: &lockstep_rl::RunSummary) {
    let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
    let head = rl.iter().take(5).map(|r| r.reward_mean).sum::<f64>() / rl.len().clamp(1, 5) as f64;
    let tail = rl.iter().rev().take(5).map(|r| r.reward_mean).sum::<f64>() / rl.len().clamp(1, 5) as f64;
    println!(
        "{name}: eval accuracy after warm-up {:.3} → final {:.3}; mean reward first 5 steps {head:.3} → last 5 steps {tail:.3}",
        s.warmup_eval, s.final_eval
    );
}
