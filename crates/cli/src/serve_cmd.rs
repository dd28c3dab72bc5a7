//! `lockstep serve`: the OpenAI-compatible server (see `crates/server`) on the embedded default
//! or a checkpoint directory.

use anyhow::Context;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Checkpoint directory (tokenizer.json / tokenizer_config.json beside the weights), or
    /// `default` for the embedded default (byte-level tokenizer).
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients pass as `model` (default: --model as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Weights seed of the embedded default.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most sequences in one engine step.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Do not record routes (responses then carry none).
    #[arg(long)]
    no_capture: bool,
    /// cpu, cuda or cuda:N (CUDA needs the `cuda` build: scripts/cuda/build.sh).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = lockstep_server::ServerConfig {
        model: args.model,
        served_model_name: args.served_model_name,
        seed: args.seed,
        max_running: args.max_running,
        capture_routes: !args.no_capture,
        device: crate::device::parse(&args.device)?,
    };
    let addr = format!("{}:{}", args.host, args.port);
    lockstep_server::serve_blocking(&cfg, &addr).with_context(|| format!("serving {}", cfg.model))
}
