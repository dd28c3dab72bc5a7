//! `lockstep`: the command-line edge of the workspace (anyhow errors live here only).

mod trace_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lockstep", version, about = "MoE reinforcement learning with routing replay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Route traces: inspect files, convert vLLM / SGLang / prime-rl payloads.
    Trace(trace_cmd::TraceArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Trace(args) => trace_cmd::run(args),
    }
}
