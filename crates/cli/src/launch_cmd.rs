//! `lockstep launch --gpus N -- <command ...>` (GPU ranks) or `--nproc N -- <command ...>
//! --device cpu` (CPU ranks): N processes on this node, each running `lockstep <command>` as one
//! rank of a group. The launcher is a thin local stand-in for torchrun: it sets each child's
//! `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (`lockstep_dist::
//! rendezvous`), and the ranks meet at the TCP store rank 0 hosts there (GPU ranks then fetch
//! the NCCL unique id rank 0 made; CPU ranks exchange over TCP). With `--nnodes M --node-rank R`
//! (run once per node, the same `--master-addr` everywhere) node R's children are ranks
//! R·N .. R·N + N - 1 of M·N. Every line a rank prints comes out prefixed with `[rank r]`. When
//! a rank fails, the others on this node are stopped (the others' collectives fail too, naming
//! it, within the rendezvous timeout) and the launcher exits with the failing rank's status.
//!
//! Commands that run over several ranks: `train`, `dist-check`, `bench-ep`. The others refuse to
//! start under a launcher rather than run N independent copies.
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
use lockstep_dist::rendezvous as rv;

/// The help's closing paragraph: the same ranks from other launchers.
pub const AFTER_HELP: &str = "\
Other launchers start the same ranks: every rank reads its place from the launcher's variables \
(torchrun's MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK; else SLURM's SLURM_PROCID, \
SLURM_NTASKS, SLURM_LOCALID, rank 0's host being the first of SLURM_JOB_NODELIST and the port \
MASTER_PORT or 29500) and meets the others at the TCP store rank 0 hosts there \
(LOCKSTEP_STORE_PORT picks another port); LOCKSTEP_RENDEZVOUS_TIMEOUT_S (default 300) bounds \
the wait.

  # 2 nodes x 8 GPUs under SLURM
  srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 lockstep train --config run.toml
  # the same with torchrun, on each node (node rank 0 and 1)
  torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr node01 --master-port 29500 \\
      --no-python lockstep train --config run.toml
  # or lockstep's own launcher, on each node
  lockstep launch --gpus 8 --nnodes 2 --node-rank 0 --master-addr node01 -- train --config run.toml
  # 4 CPU ranks on this machine
  lockstep launch --nproc 4 -- train --device cpu --steps 2";

#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct LaunchArgs {
    /// GPU ranks to start on this node, one per GPU (local ranks 0..N on cuda:0..N).
    #[arg(long, conflicts_with = "nproc")]
    pub gpus: Option<usize>,
    /// CPU ranks to start on this node (the command must say `--device cpu`); they exchange
    /// over TCP.
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Nodes in the group (run `launch` once on each).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's place, 0..nnodes (node 0 hosts rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Rank 0's host (default 127.0.0.1 on one node; required on several).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// The store's port (default: a free port on one node, 29500 on several).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds a rank waits for the others (LOCKSTEP_RENDEZVOUS_TIMEOUT_S; default 300).
    #[arg(long)]
    pub rendezvous_timeout_s: Option<String>,
    /// The lockstep command each rank runs, after `--` (e.g. `-- dist-check`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// Exit status of an interrupted rank (128 + SIGINT).
const INTERRUPTED: i32 = 130;

/// Subcommands that know how to run as one rank of a process group.
pub const MULTI_RANK_COMMANDS: &[&str] = &["train", "dist-check", "bench-ep"];

/// Whether the command says `--device cpu`.
fn says_cpu(command: &[String]) -> bool {
    command.iter().zip(command.iter().skip(1)).any(|(a, b)| a == "--device" && b == "cpu") || command.iter().any(|a| a == "--device=cpu")
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    let (nproc, cpu) = match (args.gpus, args.nproc) {
        (Some(0), _) => bail!("--gpus: at least 1"),
        (_, Some(0)) => bail!("--nproc: at least 1"),
        (Some(n), None) => (n, false),
        (None, Some(n)) => (n, true),
        _ => bail!("launch: say how many ranks to start on this node: --gpus N (GPU ranks) or --nproc N (CPU ranks, with `--device cpu`)"),
    };
    let sub = args.command.first().map(String::as_str).unwrap_or("");
    if sub == "launch" {
        bail!("launch: the command to run cannot itself be `launch`");
    }
    if !MULTI_RANK_COMMANDS.contains(&sub) {
        bail!("launch: `{sub}` does not run over several ranks (these do: {})", MULTI_RANK_COMMANDS.join(", "));
    }
    match (cpu, says_cpu(&args.command)) {
        (true, false) => bail!("launch --nproc starts CPU ranks: the command must say `--device cpu` (GPU ranks: --gpus N)"),
        (false, true) => bail!("launch --gpus starts GPU ranks, but the command says `--device cpu` (CPU ranks: --nproc N)"),
        (false, false) => check_nccl()?,
        (true, true) => {}
    }
    if args.nnodes == 0 || args.node_rank >= args.nnodes {
        bail!("--node-rank {}: not below --nnodes {}", args.node_rank, args.nnodes);
    }
    if let Some(t) = &args.rendezvous_timeout_s {
        rv::parse_timeout("--rendezvous-timeout-s", t)?;
    }
    let addr = match (&args.master_addr, args.nnodes) {
        (Some(a), _) => a.clone(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, _) => bail!("--master-addr: needed with --nnodes {} (node 0's address, the same on every node)", args.nnodes),
    };
    let port = match (args.master_port, args.nnodes) {
        (Some(0), _) => bail!("--master-port: 1..65535"),
        (Some(p), _) => p,
        (None, 1) => free_port(&addr)?,
        (None, _) => rv::DEFAULT_PORT,
    };
    let world = args.nnodes * nproc;
    let exe = std::env::current_exe().context("launch: locating the lockstep binary")?;
    let mut children: Vec<Child> = Vec::new();
    let mut pumps = Vec::new();
    for local in 0..nproc {
        let rank = args.node_rank * nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args.command).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        // the launcher's variables win over any inherited (lockstep's own come first otherwise)
        for k in rv::VARS {
            cmd.env_remove(k);
        }
        if let Ok(t) = std::env::var(rv::TIMEOUT_VAR) {
            cmd.env(rv::TIMEOUT_VAR, t);
        }
        if let Some(t) = &args.rendezvous_timeout_s {
            cmd.env(rv::TIMEOUT_VAR, t);
        }
        let vars = [(rv::MASTER_ADDR, addr.clone()), (rv::MASTER_PORT, port.to_string()), (rv::RANK, rank.to_string()), (rv::WORLD_SIZE, world.to_string()), (rv::LOCAL_RANK, local.to_string())];
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.env("LOCAL_WORLD_SIZE", nproc.to_string());
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
    let first = args.node_rank * nproc;
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
                if let Some(s) = child.try_wait().with_context(|| format!("launch: waiting for rank {}", first + rank))? {
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
        Some((i, s)) => bail!("launch: rank {} failed ({s}); the other ranks were stopped", first + i),
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

/// A free port on `addr` for the store (taken back by the OS until rank 0 binds it: a small race).
fn free_port(addr: &str) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((addr, 0)).with_context(|| format!("launch: finding a free port on {addr} (or pass --master-port)"))?;
    Ok(l.local_addr()?.port())
}

#[cfg(feature = "nccl")]
fn check_nccl() -> anyhow::Result<()> {
    let v = lockstep_dist::nccl::version().context("launch: loading NCCL")?;
    eprintln!("launch: NCCL {}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn check_nccl() -> anyhow::Result<()> {
    bail!("launch --gpus: this binary was built without NCCL (build with `--features cuda,nccl`: scripts/cuda/build.sh); CPU ranks: --nproc N -- <command> --device cpu")
}

/// For the commands that are not multi-rank: refuse to run under `launch`.
pub fn refuse_under_launch(command: &str) -> anyhow::Result<()> {
    if rv::started_as_rank(&rv::env_vars()) {
        bail!("{command} does not run over several ranks (under `lockstep launch` these do: {})", MULTI_RANK_COMMANDS.join(", "));
    }
    Ok(())
}
