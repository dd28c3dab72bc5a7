//! `lockstep launch --gpus N -- <command ...>`: one process per GPU running `lockstep <command>`,
//! joined into one NCCL process group. The launcher makes the NCCL unique id and hands each
//! rank `LOCKSTEP_RANK`, `LOCKSTEP_WORLD_SIZE`, `LOCKSTEP_LOCAL_RANK` (its GPU) and
//! `LOCKSTEP_NCCL_ID` (`lockstep_dist::launch_env`). Every line a rank prints comes out
//! prefixed with `[rank r]`. When a rank fails, the others are stopped (they would wait on it
//! in NCCL forever) and the launcher exits with the failing rank's status.
//!
//! Commands that run over several ranks: `train`, `dist-check`, `bench-ep`. The others refuse to start
//! under `launch` rather than run N independent copies.
//!
//! Ctrl-C: the ranks run in their own process group, so the terminal's SIGINT reaches only the
//! launcher, which forwards each one to every rank once (`train` finishes its step on all
//! ranks, writes a checkpoint and exits 130; a second Ctrl-C aborts). Ranks that exit 130 after
//! a Ctrl-C are not failures: the launcher exits 130 too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start, one per GPU (ranks 0..N on cuda:0..N).
    #[arg(long)]
    pub gpus: usize,
    /// The lockstep command each rank runs, after `--` (e.g. `-- dist-check`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// Exit status of an interrupted rank (128 + SIGINT).
const INTERRUPTED: i32 = 130;

/// Subcommands that know how to run as one rank of a process group.
pub const MULTI_RANK_COMMANDS: &[&str] = &["train", "dist-check", "bench-ep"];

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    if args.gpus == 0 {
        bail!("--gpus: at least 1");
    }
    let sub = args.command.first().map(String::as_str).unwrap_or("");
    if sub == "launch" {
        bail!("launch: the command to run cannot itself be `launch`");
    }
    if !MULTI_RANK_COMMANDS.contains(&sub) {
        bail!("launch: `{sub}` does not run over several ranks (these do: {})", MULTI_RANK_COMMANDS.join(", "));
    }
    let id = nccl_unique_id()?;
    let exe = std::env::current_exe().context("launch: locating the lockstep binary")?;
    let mut children: Vec<Child> = Vec::new();
    let mut pumps = Vec::new();
    for rank in 0..args.gpus {
        let env = lockstep_dist::launch_env::RankEnv { rank, world_size: args.gpus, local_rank: rank, nccl_id: id };
        let mut cmd = Command::new(&exe);
        cmd.args(&args.command).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        for (k, v) in env.vars() {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(e).with_context(|| format!("launch: starting rank {rank}"));
            }
        };
        let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        pumps.push(std::thread::spawn(move || prefix(rank, out, false)));
        pumps.push(std::thread::spawn(move || prefix(rank, err, true)));
        children.push(child);
    }
    // Ctrl-C: counted here, forwarded to the ranks below
    let interrupts = Arc::new(AtomicUsize::new(0));
    let counter = interrupts.clone();
    // SAFETY: the action only increments an atomic (async-signal-safe)
    let sigint = unsafe { signal_hook_registry::register(libc::SIGINT, move || { counter.fetch_add(1, Ordering::SeqCst); }) }.context("launch: installing the Ctrl-C handler")?;
    let mut forwarded = 0;
    // wait for all; the first failure stops the rest
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    while status.iter().any(Option::is_none) {
        let seen = interrupts.load(Ordering::SeqCst);
        while forwarded < seen {
            forwarded += 1;
            for (rank, child) in children.iter().enumerate() {
                if status[rank].is_none() {
                    // SAFETY: kill(2) on our own child's pid
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
                }
            }
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = child.try_wait().with_context(|| format!("launch: waiting for rank {rank}"))? {
                    status[rank] = Some(s);
                    let interrupted = forwarded > 0 && s.code() == Some(INTERRUPTED);
                    if !s.success() && !interrupted && failed.is_none() {
                        failed = Some((rank, s));
                    }
                }
            }
        }
        if failed.is_some() {
            stop(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pumps {
        let _ = p.join();
    }
    signal_hook_registry::unregister(sigint);
    match failed {
        None if status.iter().any(|s| s.and_then(|s| s.code()) == Some(INTERRUPTED)) => std::process::exit(INTERRUPTED),
        None => Ok(()),
        Some((rank, s)) => bail!("launch: rank {rank} failed ({s}); the other ranks were stopped"),
    }
}

fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

fn prefix(rank: usize, stream: impl std::io::Read, is_err: bool) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if is_err {
            let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
        }
    }
}

#[cfg(feature = "nccl")]
fn nccl_unique_id() -> anyhow::Result<[u8; lockstep_dist::launch_env::NCCL_ID_BYTES]> {
    let v = lockstep_dist::nccl::version().context("launch: loading NCCL")?;
    eprintln!("launch: NCCL {}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
    lockstep_dist::nccl::unique_id().context("launch: making the NCCL unique id")
}

#[cfg(not(feature = "nccl"))]
fn nccl_unique_id() -> anyhow::Result<[u8; lockstep_dist::launch_env::NCCL_ID_BYTES]> {
    bail!("launch: this binary was built without NCCL (build with `--features cuda,nccl`: scripts/cuda/build.sh)")
}

/// For the commands that are not multi-rank: refuse to run under `launch`.
pub fn refuse_under_launch(command: &str) -> anyhow::Result<()> {
    if std::env::var_os(lockstep_dist::launch_env::RANK).is_some() {
        bail!("{command} does not run over several ranks (under `lockstep launch` these do: {})", MULTI_RANK_COMMANDS.join(", "));
    }
    Ok(())
}
