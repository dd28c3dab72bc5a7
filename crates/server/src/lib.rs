//! lockstep-server: an OpenAI-compatible HTTP server (axum + tokio) over the lockstep engine.
//!
//! * `POST /v1/completions`, `POST /v1/chat/completions` — whole responses or SSE streams
//!   (`stream: true`), a drop-in for current vLLM clients: every choice carries
//!   `routed_experts` as vLLM writes it (base64 `.npy`, `(N - 1 - start, num_hidden_layers,
//!   top_k)`; `routed_experts_format: "lockstep"`: nested lists of every token, `"prime-rl"`:
//!   `{data, shape, start, dtype}`; `return_routed_experts: false`: none), its token ids
//!   (`prompt_token_ids` where vLLM puts them), lockstep's complete routes as a base64
//!   `.lstrace` file (`routes`: rows = prompt + completion tokens, none missing, router
//!   probabilities with `return_router_probs`) and the policy version; rows from
//!   `routed_experts_prompt_start` / `routed_experts_start_len` / `routes_prompt_start` on.
//!   Fields lockstep does not implement (`response_format`, ...) are refused, naming them.
//! * `POST /inference/v1/generate` (vLLM / prime-rl token-in-token-out), `POST /generate`
//!   (SGLang) — [`native`].
//! * `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//! * `POST /v1/load_weights {"path", "version"}` — waits for the running requests, swaps the
//!   weights, bumps the policy version stamped into routes (strictly increasing).
//!
//! Access ([`security`]): an API key on everything but `/health`, an admin key for
//! `load_weights`, `Host` / `Origin` checks, weights only from under a root.
//!
//! Load ([`limits`], [`listen`]): bounded connections, queue and batch (503 JSON errors with
//! `Retry-After`), header / body / idle / request timeouts, fair admission between requests in
//! the engine, `/health` saying `ok` / `overloaded` / `draining`, and a graceful drain on
//! SIGTERM / Ctrl-C ([`Drain`]).
//!
//! One OS thread owns the engine ([`scheduler`]) and steps it continuously; requests join the
//! batch between steps. The model runs the batch-invariant kernels, so what the server returns
//! (tokens, log-probabilities, routes) equals the trainer's packed forward bit for bit.

pub mod api;
pub mod error;
pub mod generate;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod native;
pub mod routes;
pub mod scheduler;
pub mod security;
pub mod state;
pub mod text;
pub mod tokenizer;

use std::net::SocketAddr;
use std::sync::Arc;

use lockstep_engine::Engine;

pub use error::{ApiError, Result, ServerError};
pub use limits::{Drain, Health, Limits};
pub use security::Security;
pub use state::{AppState, ModelInfo};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `default` (the embedded default model) or a checkpoint directory
    pub model: String,
    /// the name clients use in `model` (default: `model` as given)
    pub served_model_name: Option<String>,
    /// weights seed of the embedded default
    pub seed: u64,
    /// most sequences in one engine step
    pub max_running: usize,
    /// most sequences queued behind the running batch; a request that would exceed it gets a
    /// 503 naming `max_waiting` (default 1024)
    pub max_waiting: usize,
    /// record routes (off: no routes in responses, a little faster)
    pub capture_routes: bool,
    /// how temperature samples are drawn (`lockstep_engine::Sampler`); `None` (the default):
    /// the device's — Gumbel-max on CUDA, the exact host sampler on the CPU
    pub sampler: Option<lockstep_engine::Sampler>,
    /// where the model runs (CPU, or a CUDA device with the `cuda` build); the batch-invariant
    /// kernels either way
    pub device: candle_core::Device,
    /// weights and compute dtype (`F32`, the default, or `BF16`); reloads use the same
    pub dtype: candle_core::DType,
    /// accept checkpoint tensors the config has no place for (`--allow-unused`; default: refused
    /// by name), at start-up and in weight reloads
    pub allow_unused: bool,
    /// keys, allowed hosts, the weights root ([`Security::default`] is [`Security::open`];
    /// `lockstep serve` starts from [`Security::strict`])
    pub security: Security,
    /// connections and timeouts ([`Limits::default`]: 512 connections, 10 s headers, 30 s
    /// body, 60 s idle, no request deadline)
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model: "default".into(),
            served_model_name: None,
            seed: 0,
            max_running: 64,
            max_waiting: 1024,
            capture_routes: true,
            sampler: None,
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::F32,
            allow_unused: false,
            security: Security::default(),
            limits: Limits::default(),
        }
    }
}

/// The router and the engine thread behind it (the thread ends once the router is dropped
/// and the requests in flight are done). `Host` is checked against localhost only: [`start`]
/// and [`serve`] add the bound address.
pub fn app(cfg: &ServerConfig) -> Result<axum::Router> {
    app_at(cfg, None, None).map(|a| a.router)
}

struct App {
    router: axum::Router,
    load: Arc<limits::Load>,
    metrics: Arc<metrics::Metrics>,
}

fn app_at(cfg: &ServerConfig, bound: Option<SocketAddr>, host: Option<&str>) -> Result<App> {
    cfg.limits.validate()?;
    if cfg.max_running == 0 {
        return Err(ServerError::Config("max_running: must be >= 1".into()));
    }
    if cfg.max_waiting == 0 {
        return Err(ServerError::Config("max_waiting: must be >= 1".into()));
    }
    let guard = Arc::new(security::Guard::new(cfg.security.clone(), bound, host)?);
    let (model, tok) = state::load_model(&cfg.model, cfg.seed, cfg.dtype, &cfg.device, cfg.allow_unused)?;
    let info = ModelInfo::of(cfg.served_model_name.clone().unwrap_or_else(|| cfg.model.clone()), &model.cfg);
    let mut engine = Engine::new(model);
    engine.max_running = cfg.max_running.max(1);
    engine.set_capture_routes(cfg.capture_routes)?;
    if let Some(s) = cfg.sampler {
        engine.set_sampler(s)?;
    }
    let tok = Arc::new(tok);
    let metrics = Arc::new(metrics::Metrics::default());
    let (sched, _join) = scheduler::Scheduler::start_bounded(engine, tok.clone(), metrics.clone(), cfg.max_waiting);
    let load = Arc::new(limits::Load::new(cfg.limits.clone(), cfg.max_waiting));
    let state = AppState { sched, tok, info, metrics: metrics.clone(), device: cfg.device.clone(), dtype: cfg.dtype, allow_unused: cfg.allow_unused, guard: guard.clone(), load: load.clone() };
    let router = routes::router(Arc::new(state), guard, load.clone(), native::routes());
    Ok(App { router, load, metrics })
}

/// The host part of `host:port` (`[::1]:80` → `::1`).
fn host_of(addr: &str) -> &str {
    let h = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    h.trim_start_matches('[').trim_end_matches(']')
}

/// Bind, then build the router knowing the bound address (the `Host` check); warn loudly
/// about an exposed server.
async fn bound(cfg: &ServerConfig, addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr, App)> {
    cfg.security.validate()?;
    cfg.limits.validate()?;
    let listener = bind(addr).await?;
    let local = listener.local_addr().map_err(|e| ServerError::Io { what: "local address".into(), source: e })?;
    let app = app_at(cfg, Some(local), Some(host_of(addr)))?;
    security::warn_exposure(&cfg.security, &local);
    Ok((listener, local, app))
}

/// A server running on a tokio task (tests, benchmarks): its address, its drain handle and a
/// way to stop it.
pub struct RunningServer {
    pub addr: SocketAddr,
    drain: Drain,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// Start the graceful drain from outside (what SIGTERM does to `lockstep serve`).
    pub fn drain_handle(&self) -> Drain {
        self.drain.clone()
    }

    /// Drain: refuse new requests (503 `draining`), finish the running ones, close.
    pub async fn shutdown(self) {
        self.drain.start();
        self.wait().await;
    }

    /// Until the server has drained (someone started the drain) and returned.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| ServerError::Io { what: format!("binding {addr}"), source: e })
}

/// Start serving on `addr` (e.g. `127.0.0.1:0`) in the background.
pub async fn start(cfg: &ServerConfig, addr: &str) -> Result<RunningServer> {
    let (listener, addr, app) = bound(cfg, addr).await?;
    let drain = Drain(app.load.clone());
    let task = tokio::spawn(listen::run(listener, app.router, app.load, app.metrics));
    Ok(RunningServer { addr, drain, task })
}

/// Serve on `addr` until SIGTERM or Ctrl-C, then drain: new requests get 503 `draining`, the
/// running ones finish, and it returns `Ok` once the last connection has closed. A second
/// signal stops at once ([`ServerError::Interrupted`]).
pub async fn serve(cfg: &ServerConfig, addr: &str) -> Result<()> {
    let (listener, a, app) = bound(cfg, addr).await?;
    tracing::info!("serving {} on http://{a}", cfg.model);
    eprintln!("lockstep serve: {} on http://{a}", cfg.served_model_name.as_deref().unwrap_or(&cfg.model));
    let (drain, load) = (Drain(app.load.clone()), app.load.clone());
    let mut signals = Signals::new()?;
    let server = listen::run(listener, app.router, app.load, app.metrics);
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(()),
        () = signals.next() => {}
    }
    drain.start();
    eprintln!("lockstep serve: draining ({} connections open); a second signal stops at once", load.connections.load(std::sync::atomic::Ordering::Relaxed));
    tokio::select! {
        () = &mut server => {
            eprintln!("lockstep serve: drained");
            Ok(())
        }
        () = signals.next() => Err(ServerError::Interrupted(load.connections.load(std::sync::atomic::Ordering::Relaxed))),
    }
}

/// SIGTERM (unix) and Ctrl-C.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| ServerError::Io { what: "installing the SIGTERM handler".into(), source: e })?,
        })
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// [`serve`] on a tokio runtime of its own (for a synchronous `main`).
pub fn serve_blocking(cfg: &ServerConfig, addr: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| ServerError::Io { what: "starting the tokio runtime".into(), source: e })?;
    let r = rt.block_on(serve(cfg, addr));
    // refusals still being written and blocking loads are not waited for
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}
