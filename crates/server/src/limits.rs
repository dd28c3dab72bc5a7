//! Admission and fairness (issue #24): how much the server takes on at once and how long it
//! waits for a client, and the state every connection and handler shares — the open
//! connections, the drain flag, what `/health` says.
//!
//! * `max_connections` open connections; one more is answered at once with a 503 JSON error
//!   (`code: max_connections`, `Retry-After`) and closed ([`crate::listen`]);
//! * `max_waiting` queued sequences (the engine thread refuses more: 503, `code: max_waiting`,
//!   `Retry-After`); `max_running` sequences per engine step (the rest queue);
//! * `header_timeout` (first byte of a request to its last header), `idle_timeout` (a
//!   connection without a request), `body_timeout` (the whole body, once the headers are in:
//!   408), `request_timeout` (the whole generation: 504, its sequences dropped and their KV
//!   blocks freed);
//! * draining (SIGTERM / Ctrl-C or [`Drain::start`]): new requests get a 503 JSON error
//!   (`code: draining`), the running ones finish, then the server returns.
//!
//! Refusals for load are 503 (the server's capacity, not the client's rate), each with
//! `Retry-After`; OpenAI clients retry 503 on their own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use crate::error::{ApiError, Result, ServerError};

/// Largest request body buffered (axum's default limit, which the handlers' extractor applies too).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Seconds a refused client is told to wait (`Retry-After`).
pub const RETRY_AFTER_S: u64 = 1;

/// Bounds on what one server takes on and how long it waits for clients (`None`: no bound).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// most open connections (default 512); one more is answered 503 and closed at once
    pub max_connections: usize,
    /// from the first byte of a request to its last header (default 10 s): a slow-loris
    /// client is dropped
    pub header_timeout: Option<Duration>,
    /// the whole request body, from its headers on (default 30 s): 408
    pub body_timeout: Option<Duration>,
    /// a connection with no request in flight and no byte of a new one (default 60 s) is closed
    pub idle_timeout: Option<Duration>,
    /// a generation request's whole life (default none): 504, its sequences aborted
    pub request_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Some(Duration::from_secs(10)),
            body_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(60)),
            request_timeout: None,
        }
    }
}

impl Limits {
    /// Refuse bounds that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(ServerError::Config(format!("max_connections: {} must be in 1..=1000000", self.max_connections)));
        }
        for (name, d) in [("header_timeout", self.header_timeout), ("body_timeout", self.body_timeout), ("idle_timeout", self.idle_timeout), ("request_timeout", self.request_timeout)] {
            if d == Some(Duration::ZERO) {
                return Err(ServerError::Config(format!("{name}: 0 is no time at all (use none to disable)")));
            }
        }
        Ok(())
    }

    /// Seconds as a bound: 0 = none.
    pub fn secs(s: f64, name: &str) -> Result<Option<Duration>> {
        if !(s.is_finite() && s >= 0.0) {
            return Err(ServerError::Config(format!("{name}: {s} must be a finite number of seconds >= 0 (0: none)")));
        }
        Ok((s > 0.0).then(|| Duration::from_secs_f64(s)))
    }
}

/// What `/health` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// serving (200)
    Ok,
    /// serving, but the queue or the connections are at their limit (200: alive; the body says)
    Overloaded,
    /// refusing new requests, finishing the running ones (503: take it out of rotation)
    Draining,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Overloaded => "overloaded",
            Health::Draining => "draining",
        }
    }
}

/// The load every connection and handler sees: limits, open connections, the drain flag.
#[derive(Debug)]
pub struct Load {
    pub limits: Limits,
    /// the engine thread's queue bound
    pub max_waiting: usize,
    /// connections being served now
    pub connections: AtomicUsize,
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
}

impl Load {
    pub fn new(limits: Limits, max_waiting: usize) -> Self {
        Self { limits, max_waiting, connections: AtomicUsize::new(0), draining: AtomicBool::new(false), drain_tx: watch::channel(false).0 }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Resolves once draining starts.
    pub fn drained(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// `waiting`: sequences queued now.
    pub fn health(&self, waiting: usize) -> Health {
        if self.is_draining() {
            Health::Draining
        } else if waiting >= self.max_waiting || self.connections.load(Relaxed) >= self.limits.max_connections {
            Health::Overloaded
        } else {
            Health::Ok
        }
    }

    /// The refusal of a request while draining.
    pub fn draining_error() -> ApiError {
        ApiError::overloaded("draining", "draining: the server is shutting down and takes no new requests; retry on another replica", RETRY_AFTER_S)
    }
}

/// A handle that starts the graceful drain (cheap to clone): new requests are refused with 503
/// `draining`, running ones finish, idle connections close, then the server returns.
#[derive(Clone, Debug)]
pub struct Drain(pub(crate) Arc<Load>);

impl Drain {
    pub fn start(&self) {
        self.0.draining.store(true, Relaxed);
        self.0.drain_tx.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.0.is_draining()
    }
}

/// The middleware: while draining, everything but `GET /health` gets 503 `draining` (and the
/// connection closes); then the body is read whole within `body_timeout` (408) and at most
/// [`MAX_BODY_BYTES`] (413).
pub async fn admission(State(load): State<Arc<Load>>, req: Request, next: Next) -> Response {
    let health = req.uri().path() == "/health" && (req.method() == Method::GET || req.method() == Method::HEAD);
    if load.is_draining() && !health {
        let mut r = Load::draining_error().into_response();
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    let bytes = match load.limits.body_timeout {
        Some(d) => match tokio::time::timeout(d, read).await {
            Ok(b) => b,
            Err(_) => {
                let mut r = ApiError::body_timeout(d.as_secs_f64()).into_response();
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
        },
        None => read.await,
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return ApiError::too_large(MAX_BODY_BYTES).into_response(),
        Err(e) => return ApiError::invalid("", format!("reading the request body: {e}")).into_response(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.to_string().contains("length limit exceeded") {
            return true;
        }
        src = s.source();
    }
    false
}
