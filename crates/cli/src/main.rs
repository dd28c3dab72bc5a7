//! `lockstep`: the command-line edge of the workspace (anyhow errors live here only).

mod args;
mod bench_ep_cmd;
mod bench_graph_cmd;
mod bench_invariant_cmd;
mod bench_stages_cmd;
mod bench_rl_cmd;
mod bench_serve_cmd;
mod bench_moe_cmd;
mod consistency_cmd;
mod demo_cmd;
mod dist_check_cmd;
mod device;
#[cfg(feature = "cuda")]
mod gpu_timer;
mod init_cmd;
mod launch_cmd;
mod out;
mod serve_cmd;
mod trace_cmd;
mod train_cmd;
mod verify_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lockstep", version, about = "MoE reinforcement learning with routing replay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The RL loop with routing replay (embedded default or --config run.toml).
    Train(train_cmd::TrainArgs),
    /// Record a batch on the embedded default (or a checkpoint), replay it, print routing health.
    Demo(demo_cmd::DemoArgs),
    /// Compare a checkpoint against a transformers reference dump (logits, routes, replay).
    Verify(verify_cmd::VerifyArgs),
    /// Route traces: inspect files, convert vLLM / SGLang / prime-rl payloads.
    Trace(trace_cmd::TraceArgs),
    /// Generate with the engine, re-score the trainer's way, compare logprobs and routes.
    Consistency(consistency_cmd::ConsistencyArgs),
    /// OpenAI-compatible server (completions, chat, SSE) returning routes with every sample.
    Serve(serve_cmd::ServeArgs),
    /// Time one MoE expert layer forward + backward on the GPU (grouped GEMM CUDA ops).
    BenchMoe(bench_moe_cmd::BenchMoeArgs),
    /// Time the batch-invariant CUDA kernels against candle's (cuBLAS): matmul, attention, a forward.
    BenchInvariant(bench_invariant_cmd::BenchInvariantArgs),
    /// Where a training micro-batch's time goes at a config's width: a decoder layer, its MoE block, the attention kernel, a head chunk (forward / backward).
    BenchStages(bench_stages_cmd::BenchStagesArgs),
    /// The rollout engine's serving speed: concurrency sweep, capture on / off, JSON out (`--random config.json`: weights drawn on the device).
    BenchServe(bench_serve_cmd::BenchServeArgs),
    /// Probe CUDA graphs for the decode step: one forward_paged step eager vs captured and replayed, per batch size.
    BenchGraph(bench_graph_cmd::BenchGraphArgs),
    /// Start the ranks on this node: `launch --gpus N -- train` (NCCL), `--nproc N -- train --device cpu` (TCP), `--nnodes/--node-rank/--master-addr` across nodes; under torchrun / srun no launcher is needed.
    Launch(launch_cmd::LaunchArgs),
    /// Expert + data parallelism over W ranks equal one rank (thread ranks, or under `launch`).
    DistCheck(dist_check_cmd::DistCheckArgs),
    /// Time EP dispatch / combine beside plain NCCL all-to-all, and an EP MoE layer vs one GPU.
    BenchEp(bench_ep_cmd::BenchEpArgs),
    /// A random-weight checkpoint for a config.json, sharded as transformers writes one.
    Init(init_cmd::InitArgs),
    /// Time a synthetic RL step by phase: rollouts, pi_old scoring, fwd+bwd+optimizer, weight sync; MFU, JSON out.
    BenchRl(bench_rl_cmd::BenchRlArgs),
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // one line per cause, no backtrace: errors name the file / field / layer at fault
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Commands that print a report and exit behave like Unix filters on a closed pipe
/// (`lockstep trace inspect FILE | head -1`): the default SIGPIPE action ends the process
/// quietly, where Rust's ignored SIGPIPE made `println!` panic with "Broken pipe". Not for
/// `serve`, `train`, `launch`, `dist-check` or `bench-ep`, whose sockets and children must see
/// EPIPE as an error: those print through `out` (best effort, no panic).
fn quiet_on_closed_pipe() {
    // SAFETY: `signal` installs the default disposition for SIGPIPE (no handler code of ours
    // runs in signal context); called once at start-up, before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let single_rank = match &cli.command {
        Command::Launch(_) | Command::DistCheck(_) | Command::BenchEp(_) | Command::Train(_) => None,
        Command::Demo(_) => Some("demo"),
        Command::Verify(_) => Some("verify"),
        Command::Trace(_) => Some("trace"),
        Command::Consistency(_) => Some("consistency"),
        Command::Serve(_) => Some("serve"),
        Command::BenchMoe(_) => Some("bench-moe"),
        Command::BenchInvariant(_) => Some("bench-invariant"),
        Command::BenchStages(_) => Some("bench-stages"),
        Command::BenchServe(_) => Some("bench-serve"),
        Command::BenchGraph(_) => Some("bench-graph"),
        Command::Init(_) => Some("init"),
        Command::BenchRl(_) => Some("bench-rl"),
    };
    if let Some(name) = single_rank {
        launch_cmd::refuse_under_launch(name)?;
    }
    if matches!(
        cli.command,
        Command::Trace(_) | Command::Demo(_) | Command::Verify(_) | Command::Consistency(_) | Command::BenchMoe(_) | Command::BenchInvariant(_) | Command::BenchStages(_) | Command::BenchServe(_) | Command::BenchGraph(_) | Command::Init(_) | Command::BenchRl(_)
    ) {
        quiet_on_closed_pipe();
    }
    match cli.command {
        Command::Train(args) => train_cmd::run_cmd(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Verify(args) => verify_cmd::run(args),
        Command::Trace(args) => trace_cmd::run(args),
        Command::Consistency(args) => consistency_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(args),
        Command::BenchMoe(args) => bench_moe_cmd::run(args),
        Command::BenchInvariant(args) => bench_invariant_cmd::run(args),
        Command::BenchStages(args) => bench_stages_cmd::run(args),
        Command::BenchServe(args) => bench_serve_cmd::run(args),
        Command::BenchGraph(args) => bench_graph_cmd::run(args),
        Command::Launch(args) => launch_cmd::run(args),
        Command::DistCheck(args) => dist_check_cmd::run(args),
        Command::BenchEp(args) => bench_ep_cmd::run(args),
        Command::Init(args) => init_cmd::run(args),
        Command::BenchRl(args) => bench_rl_cmd::run(args),
    }
}
