//! `lockstep train`: the RL loop with routing replay on the embedded default (or a TOML config),
//! a progress bar, per-step metrics (JSONL), checkpoints and an HTML run report. Ctrl-C
//! finishes the current step, writes a checkpoint, prints the command that resumes it and exits
//! with 130; a second Ctrl-C aborts at once.
//!
//! Over ranks (expert parallelism + data parallelism, `lockstep_rl::run`'s module notes):
//! `--ranks N` runs N thread ranks in this process on `--device`; started as a rank by a
//! launcher (torchrun, `srun`, `lockstep launch`: `lockstep_dist::rendezvous`) each process is
//! one rank — an NCCL rank on the GPU of its local rank, or with `--device cpu` a CPU rank over
//! TCP. Rank 0 prints, shows the progress bar and writes the run directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use lockstep_dist::Collective;
use lockstep_rl::{run, RlError, RunConfig, RunOptions, RunSummary};
use lockstep_trainer::parallel::Parallel;

/// Exit status after Ctrl-C (128 + SIGINT), as shells report it.
const INTERRUPTED: i32 = 130;

/// SIGINT handler: the first sets `stop` (the run finishes its step and checkpoints), the second
/// exits at once. Only async-signal-safe calls inside (an atomic swap, write(2), _exit(2)).
fn install_sigint(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let action = move || {
        let msg: &[u8] = if stop.swap(true, Ordering::SeqCst) {
            b"\nsecond Ctrl-C: aborting without a checkpoint\n"
        } else {
            b"\nCtrl-C: finishing the current step, then writing a checkpoint (Ctrl-C again aborts)\n"
        };
        let second = msg.starts_with(b"\nsecond");
        // SAFETY: write(2) and _exit(2) are async-signal-safe
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            if second {
                libc::_exit(INTERRUPTED);
            }
        }
    };
    // SAFETY: the action only does async-signal-safe work (above)
    unsafe { signal_hook_registry::register(libc::SIGINT, action) }.context("installing the Ctrl-C handler")?;
    Ok(())
}

/// A path as one shell word.
fn shell_word(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Print where an interrupted run stopped and the command that resumes it; exit 130.
fn interrupted(after: &str, checkpoint: &Path, run_dir: &Path, compare: bool, ranks: Ranks) -> ! {
    let exe = std::env::args_os().next().map(PathBuf::from).unwrap_or_else(|| "lockstep".into());
    let (pre, post) = match ranks {
        Ranks::One => (String::new(), String::new()),
        Ranks::Threads(n) => (String::new(), format!(" --ranks {n}")),
        Ranks::Launched { world, cpu: false } => (format!("launch --gpus {world} -- "), String::new()),
        Ranks::Launched { world, cpu: true } => (format!("launch --nproc {world} -- "), " --device cpu".to_string()),
    };
    eprintln!("interrupted after {after}; checkpoint written: {}", checkpoint.display());
    eprintln!(
        "resume with:\n  {} {pre}train --config {} --resume {}{post}",
        shell_word(&exe),
        shell_word(&run_dir.join("config.toml")),
        shell_word(checkpoint)
    );
    if compare {
        eprintln!("(that resumes this one arm of --compare-replay; the comparison report needs all three)");
    }
    std::process::exit(INTERRUPTED);
}

/// How the run is spread, for the resume command.
#[derive(Clone, Copy)]
enum Ranks {
    One,
    Threads(usize),
    /// started by a launcher (the resume command is given as `lockstep launch`'s)
    Launched { world: usize, cpu: bool },
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run configuration (TOML); the embedded default when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// Run one seed three ways — lockstep; mismatched rollouts (`rollout.mismatch`, default
    /// bf16) with replay off; the same with replay on — into one report and table.
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
    /// cpu or cuda[:N] (default cpu). Started as a rank by a launcher: `cpu` makes CPU ranks
    /// over TCP; otherwise each rank uses the GPU of its local rank, over NCCL.
    #[arg(long)]
    device: Option<String>,
    /// Seconds a rank started by a launcher waits for the others (overrides
    /// LOCKSTEP_RENDEZVOUS_TIMEOUT_S; default 300).
    #[arg(long)]
    rendezvous_timeout_s: Option<String>,
    /// Thread ranks in this process (experts sharded over them, data parallel for the rest);
    /// under `launch`, the ranks are the launched processes.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
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
        crate::out::say_raw!("{}", cfg.to_toml());
        return Ok(());
    }
    let out = PathBuf::from(&cfg.output.dir);
    let stop = Arc::new(AtomicBool::new(false));
    install_sigint(stop.clone())?;
    if args.compare_replay && args.resume.is_some() {
        bail!("--compare-replay starts both runs from scratch; drop --resume");
    }
    if args.ranks == 0 {
        bail!("--ranks: at least 1");
    }
    let t0 = std::time::Instant::now();
    let base = RunOptions { resume: args.resume.clone(), progress: !args.quiet, stop: Some(stop), ..RunOptions::default() };
    let timeout = args.rendezvous_timeout_s.as_deref().map(|t| lockstep_dist::rendezvous::parse_timeout("--rendezvous-timeout-s", t)).transpose()?;
    let launched = lockstep_dist::ranks::Launch::from_env(timeout)?;
    let device = args.device.as_deref().unwrap_or("cpu");
    let runs = match launched {
        Some(launch) => {
            if args.ranks != 1 {
                bail!("--ranks {}: under a launcher the ranks are the launched processes", args.ranks);
            }
            let cpu = device == "cpu" && args.device.is_some();
            let joined = launch.join(cpu).context(if cpu { "joining the process group (CPU ranks over TCP)" } else { "joining the NCCL process group" })?;
            let ranks = Ranks::Launched { world: launch.world_size(), cpu };
            let r = rank_runs(&cfg, &out, &args, RunOptions { device: Some(joined.device.clone()), parallel: group(joined.comm.clone()), ..base.clone() }, ranks);
            if launch.rank() != 0 {
                // rank 0 says how to resume an interrupted run; the others exit as it does
                if let Err(e) = &r {
                    if matches!(e.downcast_ref::<RlError>(), Some(RlError::Interrupted { .. })) {
                        std::process::exit(INTERRUPTED);
                    }
                }
                return r.map(|_| ());
            }
            r?
        }
        None if args.ranks > 1 => {
            let dev = crate::device::parse(device)?;
            let (cfg, out, args, base) = (&cfg, &out, &args, &base);
            // rank 0's runs, or the error of the rank that failed first
            lockstep_dist::run_threads(args.ranks, move |c| {
                rank_runs(cfg, out, args, RunOptions { device: Some(dev.clone()), parallel: group(Arc::new(c)), ..base.clone() }, Ranks::Threads(args.ranks))
            })?
            .swap_remove(0)
        }
        None => rank_runs(&cfg, &out, &args, RunOptions { device: Some(crate::device::parse(device)?), ..base.clone() }, Ranks::One)?,
    };
    if args.compare_replay {
        let arms: Vec<(String, Vec<lockstep_rl::metrics::StepRecord>)> = ARMS.iter().zip(&runs).map(|(a, r)| (a.label(&mismatch_of(&cfg)), r.records.clone())).collect();
        lockstep_rl::report::write(&out.join("report.html"), &arms, "lockstep train --compare-replay: lockstep vs mismatched rollouts without / with replay")?;
        let table = lockstep_rl::report::compare_table(&arms);
        std::fs::write(out.join("compare.md"), &table).with_context(|| format!("writing {}", out.join("compare.md").display()))?;
        crate::out::say_raw!("{table}");
        for ((name, _), s) in arms.iter().zip(&runs) {
            print_summary(name, s);
        }
        crate::out::say!("report: {}\ntable: {}", out.join("report.html").display(), out.join("compare.md").display());
    } else {
        print_summary(if cfg.replay.enabled { "replay on" } else { "replay off" }, &runs[0]);
        crate::out::say!("metrics: {}\nreport: {}", out.join("metrics.jsonl").display(), out.join("report.html").display());
    }
    crate::out::say!("wall time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn group(comm: Arc<dyn Collective>) -> Parallel {
    Some(Arc::new(lockstep_dist::RankGroup::new(comm)))
}

/// The arms of `--compare-replay`, one seed: (a) lockstep (the engine runs the trainer's weights
/// and kernels; replay on), (b) mismatched rollouts (`rollout.mismatch`, bf16 unless the config
/// names another) with replay off, (c) the same mismatch with replay on.
#[derive(Clone, Copy)]
struct Arm {
    dir: &'static str,
    mismatch: bool,
    replay: bool,
}

const ARMS: [Arm; 3] = [
    Arm { dir: "lockstep", mismatch: false, replay: true },
    Arm { dir: "mismatch_replay_off", mismatch: true, replay: false },
    Arm { dir: "mismatch_replay_on", mismatch: true, replay: true },
];

impl Arm {
    fn label(&self, mismatch: &str) -> String {
        match (self.mismatch, self.replay) {
            (false, _) => "lockstep (replay on)".to_string(),
            (true, false) => format!("{mismatch} rollouts, replay off"),
            (true, true) => format!("{mismatch} rollouts, replay on"),
        }
    }
}

/// The mismatch the comparison's arms (b) and (c) use.
fn mismatch_of(cfg: &RunConfig) -> String {
    if cfg.rollout.mismatch == "none" {
        "bf16".to_string()
    } else {
        cfg.rollout.mismatch.clone()
    }
}

/// This rank's run(s): one, or the three arms of `--compare-replay`. A run that the stop flag
/// ended says how to resume it (rank 0) and exits 130.
fn rank_runs(cfg: &RunConfig, out: &Path, args: &TrainArgs, opts: RunOptions, ranks: Ranks) -> anyhow::Result<Vec<RunSummary>> {
    let rank0 = opts.parallel.as_ref().is_none_or(|p| p.rank() == 0);
    let go = |cfg: &RunConfig, dir: &Path, replay: bool| match run(cfg, dir, replay, &opts) {
        Err(RlError::Interrupted { after, checkpoint }) if rank0 => interrupted(&after, &checkpoint, dir, args.compare_replay, ranks),
        r => r,
    };
    if args.compare_replay {
        if cfg.loss.ratio.starts_with("joint") {
            bail!("--compare-replay runs an arm with replay off, which loss.ratio = `{}` cannot take (it needs replay): compare with ratio = token or router_shift", cfg.loss.ratio);
        }
        if !cfg.rollout.servers.is_empty() {
            bail!("--compare-replay makes its own mismatched rollouts in process; leave rollout.servers empty");
        }
        let mut runs = Vec::new();
        for arm in ARMS {
            let mut c = cfg.clone();
            c.rollout.mismatch = if arm.mismatch { mismatch_of(cfg) } else { "none".into() };
            runs.push(go(&c, &out.join(arm.dir), arm.replay)?);
        }
        Ok(runs)
    } else {
        Ok(vec![go(cfg, out, cfg.replay.enabled)?])
    }
}

fn print_summary(name: &str, s: &lockstep_rl::RunSummary) {
    let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
    let head = rl.iter().take(5).map(|r| r.reward_mean).sum::<f64>() / rl.len().clamp(1, 5) as f64;
    let tail = rl.iter().rev().take(5).map(|r| r.reward_mean).sum::<f64>() / rl.len().clamp(1, 5) as f64;
    crate::out::say!(
        "{name}: eval accuracy after warm-up {:.3} → final {:.3}; held-out reward {:.3} → {:.3}; mean reward first 5 steps {head:.3} → last 5 steps {tail:.3}",
        s.warmup_eval, s.final_eval, s.warmup_eval_reward, s.final_eval_reward
    );
    if let Some(pass) = rl.iter().rev().find(|r| !r.eval_pass_at.is_empty()).map(|r| &r.eval_pass_at) {
        let list: Vec<String> = pass.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
        crate::out::say!("{name}: last eval {}", list.join(", "));
    }
}
