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
    /// Most sequences queued behind the running batch; more get 503 `max_waiting` with
    /// Retry-After (admission control).
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// Most open connections; one more is answered 503 `max_connections` (Retry-After) and
    /// closed at once.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds from a request's first byte to its last header (slow clients are dropped);
    /// 0: no bound.
    #[arg(long, default_value_t = 10.0)]
    header_timeout_s: f64,
    /// Seconds for the whole request body once the headers are in (408); 0: no bound.
    #[arg(long, default_value_t = 30.0)]
    body_timeout_s: f64,
    /// Seconds a connection may sit without a request before it is closed; 0: no bound.
    #[arg(long, default_value_t = 60.0)]
    idle_timeout_s: f64,
    /// Seconds a generation request may take in all (504, its sequences aborted and their KV
    /// blocks freed); 0 (the default): no deadline.
    #[arg(long, default_value_t = 0.0)]
    request_timeout_s: f64,
    /// Do not record routes (responses then carry none).
    #[arg(long)]
    no_capture: bool,
    /// How temperature samples are drawn: gumbel (Gumbel-max on the device, only the tokens come
    /// back; the CUDA default) or exact (the logits rows to the host, inverse CDF; the CPU
    /// default). Requests with top_k / top_p always take the exact host path.
    #[arg(long)]
    sampler: Option<String>,
    /// cpu, cuda or cuda:N (CUDA needs the `cuda` build: scripts/cuda/build.sh).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights and compute dtype: f32 or bf16 (weight reloads load in it too).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Accept checkpoint tensors the config has no place for (an `lm_head.weight` beside
    /// `tie_word_embeddings: true`, layers past `num_hidden_layers`): ignored instead of refused
    /// by name. Applies to weight reloads too.
    #[arg(long)]
    allow_unused: bool,
    /// API key required as `Authorization: Bearer <key>` on every endpoint but `GET /health`
    /// (default: $LOCKSTEP_API_KEY; none: no key needed). Prefer the variable: flags show in `ps`.
    #[arg(long)]
    api_key: Option<String>,
    /// Admin key required as `Authorization: Bearer <key>` on `POST /v1/load_weights`
    /// (default: $LOCKSTEP_ADMIN_KEY; none: load_weights is disabled).
    #[arg(long)]
    admin_key: Option<String>,
    /// Without an admin key, serve load_weights anyway (to holders of the API key, or to
    /// anyone without one): the behaviour before keys existed.
    #[arg(long)]
    allow_unauthenticated_load_weights: bool,
    /// Further names accepted in the `Host` / `Origin` headers, comma-separated, or `*` for any
    /// (localhost, 127.0.0.1, ::1 and the bound address always are).
    #[arg(long, value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// load_weights reads checkpoint directories only under this directory (default: the
    /// current directory).
    #[arg(long)]
    weights_root: Option<std::path::PathBuf>,
    /// Accept a load_weights at the current policy version (a reload without a bump, as the
    /// RL loop's remote client sends today); lower versions are refused either way.
    #[arg(long)]
    allow_same_version: bool,
}

/// `flag`, else the environment variable `var` (unset: none).
fn flag_or_env(flag: Option<String>, var: &str) -> anyhow::Result<Option<String>> {
    match flag {
        Some(v) => Ok(Some(v)),
        None => match std::env::var(var) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("${var} is not valid UTF-8"),
        },
    }
}

fn secs(s: f64, flag: &str) -> anyhow::Result<Option<std::time::Duration>> {
    Ok(lockstep_server::Limits::secs(s, flag)?)
}

/// Serve until SIGTERM or Ctrl-C, then drain (new requests 503 `draining`, running ones
/// finish) and exit 0; a second signal stops at once (exit 1).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = lockstep_server::ServerConfig {
        model: args.model,
        served_model_name: args.served_model_name,
        seed: args.seed,
        max_running: args.max_running,
        max_waiting: args.max_waiting,
        capture_routes: !args.no_capture,
        sampler: match args.sampler.as_deref() {
            None => None,
            Some(s) => Some(lockstep_engine::Sampler::parse(s).ok_or_else(|| anyhow::anyhow!("--sampler `{s}`: expected gumbel or exact"))?),
        },
        device: crate::device::parse(&args.device)?,
        dtype: crate::args::dtype(&args.dtype)?,
        allow_unused: args.allow_unused,
        security: lockstep_server::Security {
            api_key: flag_or_env(args.api_key, "LOCKSTEP_API_KEY")?,
            admin_key: flag_or_env(args.admin_key, "LOCKSTEP_ADMIN_KEY")?,
            allow_unauthenticated_load_weights: args.allow_unauthenticated_load_weights,
            allowed_hosts: args.allowed_hosts,
            weights_root: Some(args.weights_root.unwrap_or_else(|| ".".into())),
            allow_same_version: args.allow_same_version,
        },
        limits: lockstep_server::Limits {
            max_connections: args.max_connections,
            header_timeout: secs(args.header_timeout_s, "--header-timeout-s")?,
            body_timeout: secs(args.body_timeout_s, "--body-timeout-s")?,
            idle_timeout: secs(args.idle_timeout_s, "--idle-timeout-s")?,
            request_timeout: secs(args.request_timeout_s, "--request-timeout-s")?,
        },
    };
    let addr = format!("{}:{}", args.host, args.port);
    lockstep_server::serve_blocking(&cfg, &addr).with_context(|| format!("serving {}", cfg.model))
}
