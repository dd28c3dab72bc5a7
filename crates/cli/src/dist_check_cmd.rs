//! `lockstep dist-check`: expert parallelism + data parallelism over W ranks equal one rank on
//! the same global batch (`lockstep_dist::check`: logits, routes, every gradient, replicated
//! gradients bitwise equal across ranks, bitwise replay, reduced routing health), for token
//! choice and expert choice.
//!
//! - Started as a rank by a launcher (`lockstep launch --gpus W -- dist-check`, torchrun,
//!   `srun`): one NCCL rank per GPU; with `--device cpu` (`launch --nproc W -- dist-check
//!   --device cpu`) CPU ranks over TCP.
//! - Alone: `--ranks W` thread ranks in this process on `--device` (CPU or one GPU).
//!
//! Exits non-zero when any rank fails; rank 0 prints the verdict of all ranks.

use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;
use lockstep_dist::check::{check_rank, CheckCase, RankReport};
use lockstep_dist::Collective;

#[derive(Args, Debug)]
pub struct DistCheckArgs {
    /// Thread ranks when not started by a launcher.
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
    /// cpu or cuda[:N] (default cpu). Started by a launcher: `cpu` makes CPU ranks over TCP;
    /// otherwise each rank uses the GPU of its local rank.
    #[arg(long)]
    pub device: Option<String>,
    /// Seconds a rank started by a launcher waits for the others (overrides
    /// LOCKSTEP_RENDEZVOUS_TIMEOUT_S; default 300).
    #[arg(long)]
    pub rendezvous_timeout_s: Option<String>,
    /// Routers to check: token (top-k), expert (expert choice, pools per sequence).
    #[arg(long, value_delimiter = ',', default_value = "token,expert")]
    pub routing: Vec<String>,
    /// f32 (tolerance 1e-5 logits, 1e-4 gradients) or bf16 (3e-2).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Rows of the global batch (a multiple of the ranks) and tokens per row.
    #[arg(long, default_value_t = 4)]
    pub rows: usize,
    #[arg(long, default_value_t = 24)]
    pub seq: usize,
}

pub fn run(args: DistCheckArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: expected f32 or bf16"),
    };
    let mut cases = Vec::new();
    for r in &args.routing {
        let expert_choice = match r.as_str() {
            "token" => false,
            "expert" => true,
            other => bail!("--routing {other}: expected token or expert"),
        };
        cases.push((r.clone(), CheckCase { rows: args.rows, seq: args.seq, expert_choice, dtype, seed: 5 }));
    }
    let mut failed = 0;
    let timeout = args.rendezvous_timeout_s.as_deref().map(|t| lockstep_dist::rendezvous::parse_timeout("--rendezvous-timeout-s", t)).transpose()?;
    match lockstep_dist::ranks::Launch::from_env(timeout)? {
        Some(launch) => {
            let cpu = args.device.as_deref() == Some("cpu");
            let joined = launch.join(cpu).context(if cpu { "joining the process group (CPU ranks over TCP)" } else { "joining the NCCL process group" })?;
            for (name, case) in &cases {
                let rep = check_rank(case, joined.comm.clone(), &joined.device).with_context(|| format!("{name} choice"))?;
                failed += report(name, &rep, dtype, joined.comm.as_ref())?;
            }
        }
        None => {
            let dev = crate::device::parse(args.device.as_deref().unwrap_or("cpu"))?;
            if args.ranks == 0 {
                bail!("--ranks: at least 1");
            }
            for (name, case) in &cases {
                let reps = lockstep_dist::run_threads(args.ranks, |c| check_rank(case, Arc::new(c), &dev)).with_context(|| format!("{name} choice"))?;
                for rep in &reps {
                    let f = rep.failures(dtype);
                    crate::out::say!("{name} choice {} {}", rep.summary(), if f.is_empty() { "ok".into() } else { format!("FAILED: {}", f.join("; ")) });
                    failed += usize::from(!f.is_empty());
                }
            }
        }
    }
    if failed > 0 {
        bail!("dist-check: {failed} rank check(s) failed");
    }
    Ok(())
}

/// Print this rank's line; rank 0 also prints how many ranks failed. Returns this rank's failures (0/1).
fn report(name: &str, rep: &RankReport, dtype: DType, comm: &dyn Collective) -> anyhow::Result<usize> {
    let f = rep.failures(dtype);
    crate::out::say!("{name} choice {} {}", rep.summary(), if f.is_empty() { "ok".into() } else { format!("FAILED: {}", f.join("; ")) });
    let all = comm.all_gather_host(&[f.len() as f64])?;
    if comm.rank() == 0 {
        let bad: Vec<usize> = all.iter().enumerate().filter(|(_, v)| v[0] > 0.0).map(|(r, _)| r).collect();
        if bad.is_empty() {
            crate::out::say!("{name} choice: all {} ranks equal one rank", comm.world_size());
        } else {
            crate::out::say!("{name} choice: ranks {bad:?} differ from one rank");
        }
    }
    Ok(usize::from(!f.is_empty()))
}
