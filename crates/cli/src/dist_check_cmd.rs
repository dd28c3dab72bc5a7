//! `lockstep dist-check`: expert parallelism + data parallelism over W ranks equal one rank on
//! the same global batch (`lockstep_dist::check`: logits, routes, every gradient, replicated
//! gradients bitwise equal across ranks, bitwise replay, reduced routing health), for token
//! choice and expert choice.
//!
//! - Under `lockstep launch --gpus W -- dist-check`: one NCCL rank per GPU.
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
    /// Thread ranks when not started by `lockstep launch`.
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
    /// cpu or cuda[:N] (thread ranks only; launched ranks use their own GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    match lockstep_dist::launch_env::RankEnv::from_env()? {
        Some(env) => {
            let (comm, dev) = lockstep_dist::ranks::join_launched(&env).context("joining the NCCL process group")?;
            for (name, case) in &cases {
                let rep = check_rank(case, comm.clone(), &dev).with_context(|| format!("{name} choice"))?;
                failed += report(name, &rep, dtype, comm.as_ref())?;
            }
        }
        None => {
            let dev = crate::device::parse(&args.device)?;
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
