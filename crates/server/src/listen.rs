//! The accept loop: HTTP/1.1 connections served by hyper under [`Limits`], and the drain.
//!
//! * At most `max_connections` are served; one more is answered at once — `503` with a JSON
//!   error (`code: max_connections`) and `Retry-After`, or `200 {"status": "overloaded"}` for
//!   `GET /health` — and closed (at most [`MAX_REFUSING`] such answers at a time; beyond that
//!   the socket is closed unanswered).
//! * Each connection has a watchdog: with no request in flight, the first byte of a request
//!   starts `header_timeout` (the connection is dropped when its headers are not all in by
//!   then: slow loris), and no byte at all for `idle_timeout` closes it. hyper's own
//!   `header_read_timeout` (which counts from the connection going idle) backs both up, at their
//!   sum. The body and the generation have their own bounds ([`crate::limits::admission`],
//!   `request_timeout` in the handlers).
//! * Draining: every connection finishes the request it is serving and closes (keep-alive off);
//!   new connections get `503 draining` until the last served one has closed; then [`run`]
//!   returns.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::limits::{Limits, Load, RETRY_AFTER_S};
use crate::metrics::Metrics;

/// Refusals answered at a time; more over-limit connections are closed unanswered.
pub const MAX_REFUSING: usize = 64;

/// Serve `router` on `listener` until draining has started and every served connection has
/// closed.
pub async fn run(listener: TcpListener, router: Router, load: Arc<Load>, metrics: Arc<Metrics>) {
    let limits = load.limits.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut drain = load.drained();
    let mut draining = *drain.borrow();
    loop {
        let all_closed = async {
            if draining {
                let _ = slots.acquire_many(limits.max_connections as u32).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let (tcp, _peer) = tokio::select! {
            // a drain that has begun is seen before the next connection is taken, and the end
            // of the drain before more refusals
            biased;
            _ = drain.changed(), if !draining => {
                draining = true;
                tracing::info!("draining: {} connections open", load.connections.load(Relaxed));
                continue;
            }
            () = all_closed => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // out of file descriptors and the like: wait, then accept again
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let permit = if draining { None } else { slots.clone().try_acquire_owned().ok() };
        let Some(permit) = permit else {
            let why = if draining { Why::Draining } else { Why::Full(limits.max_connections) };
            metrics.refused_connections.fetch_add(1, Relaxed);
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp, why).await;
                    drop(p);
                });
            }
            continue;
        };
        load.connections.fetch_add(1, Relaxed);
        let (router, load, drain) = (router.clone(), load.clone(), load.drained());
        tokio::spawn(async move {
            serve_connection(tcp, router, &load, drain).await;
            load.connections.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

/// One connection: hyper's HTTP/1.1 with the watchdog beside it.
async fn serve_connection(tcp: TcpStream, router: Router, load: &Load, mut drain: tokio::sync::watch::Receiver<bool>) {
    let limits = &load.limits;
    let watch = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { io: tcp, watch: watch.clone() });
    let w = watch.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = InFlight::begin(w.clone());
        let fut = TowerToHyperService::new(router.clone()).call(req);
        async move {
            let resp = fut.await?;
            Ok::<_, Infallible>(resp.map(|b| Body::new(Tracked { inner: b, _guard: guard })))
        }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new());
    let backstop = match (limits.header_timeout, limits.idle_timeout) {
        (Some(h), Some(i)) => Some(h + i),
        (Some(h), None) => Some(h + Duration::from_secs(3600)),
        (None, _) => None,
    };
    b.header_read_timeout(backstop);
    let conn = b.serve_connection(io, svc);
    tokio::pin!(conn);
    let tick = [limits.header_timeout, limits.idle_timeout].into_iter().flatten().min().map(|d| (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    // a connection accepted as the drain began is not closed before its first request: that
    // gets `503 draining` with `Connection: close` (and a silent one meets the timeouts)
    let mut shutting = false;
    loop {
        let sleep = async {
            match tick {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = drain.changed(), if !shutting => {
                shutting = true;
                conn.as_mut().graceful_shutdown();
            }
            () = sleep => match watch.verdict(limits, Instant::now()) {
                Verdict::Fine => {}
                Verdict::SlowHeaders => {
                    tracing::debug!("dropping a connection: headers not in within header_timeout");
                    return;
                }
                Verdict::Idle => return,
            },
        }
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy)]
enum Why {
    Full(usize),
    Draining,
}

/// Answer an over-limit connection and close it: read its request line (at most 1 KiB, 1 s),
/// write the answer, then drain what it still sends (at most 64 KiB, 1 s) so that closing does
/// not reset the connection before the client reads the answer.
async fn refuse(mut tcp: TcpStream, why: Why) {
    let mut buf = [0u8; 1024];
    let mut n = 0;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while n < buf.len() {
            match tcp.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if buf[..n].windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let health = buf[..n].starts_with(b"GET /health ") || buf[..n].starts_with(b"GET /health?");
    let (status, body) = match (why, health) {
        (Why::Full(_), true) => ("200 OK", serde_json::json!({"status": "overloaded"})),
        (Why::Draining, true) => ("503 Service Unavailable", serde_json::json!({"status": "draining"})),
        (Why::Full(max), false) => (
            "503 Service Unavailable",
            crate::error::ApiError::overloaded("max_connections", format!("max_connections: {max} connections are open (at most {max}); retry later"), RETRY_AFTER_S).body(),
        ),
        (Why::Draining, false) => ("503 Service Unavailable", Load::draining_error().body()),
    };
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: {RETRY_AFTER_S}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while let Ok(k) = tcp.read(&mut sink).await {
            total += k;
            if k == 0 || total > 64 << 10 {
                break;
            }
        }
    })
    .await;
}

/// A connection's clock: requests in flight, since when it has been idle, since when the
/// head of a new request has been arriving.
#[derive(Debug)]
struct Activity(Mutex<Times>);

#[derive(Debug)]
struct Times {
    in_flight: usize,
    idle_since: Instant,
    head_since: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    SlowHeaders,
    Idle,
}

impl Activity {
    fn new() -> Self {
        Self(Mutex::new(Times { in_flight: 0, idle_since: Instant::now(), head_since: None }))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Times) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Bytes came in.
    fn read(&self) {
        self.with(|t| {
            if t.in_flight == 0 && t.head_since.is_none() {
                t.head_since = Some(Instant::now());
            }
        })
    }

    fn verdict(&self, limits: &Limits, now: Instant) -> Verdict {
        self.with(|t| {
            if t.in_flight > 0 {
                return Verdict::Fine;
            }
            match (t.head_since, limits.header_timeout, limits.idle_timeout) {
                (Some(h), Some(d), _) if now.duration_since(h) >= d => Verdict::SlowHeaders,
                (None, _, Some(d)) if now.duration_since(t.idle_since) >= d => Verdict::Idle,
                _ => Verdict::Fine,
            }
        })
    }
}

/// A request being served on a connection (until its response body is done or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(a: Arc<Activity>) -> Self {
        a.with(|t| {
            t.in_flight += 1;
            t.head_since = None;
        });
        Self(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.with(|t| {
            t.in_flight = t.in_flight.saturating_sub(1);
            if t.in_flight == 0 {
                t.idle_since = Instant::now();
                t.head_since = None;
            }
        })
    }
}

/// A response body that holds its request's [`InFlight`] until it is done.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting every read that brings bytes.
struct Watched {
    io: TcpStream,
    watch: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let limits = Limits { header_timeout: Some(Duration::from_secs(10)), idle_timeout: Some(Duration::from_secs(60)), ..Limits::default() };
        let a = Activity::new();
        let t0 = a.with(|t| t.idle_since);
        assert_eq!(a.verdict(&limits, t0 + Duration::from_secs(59)), Verdict::Fine);
        assert_eq!(a.verdict(&limits, t0 + Duration::from_secs(60)), Verdict::Idle);
        a.read();
        let h = a.with(|t| t.head_since).unwrap();
        assert_eq!(a.verdict(&limits, h + Duration::from_secs(9)), Verdict::Fine);
        assert_eq!(a.verdict(&limits, h + Duration::from_secs(10)), Verdict::SlowHeaders);
        let g = InFlight::begin(Arc::new(Activity::new()));
        assert_eq!(g.0.verdict(&limits, Instant::now() + Duration::from_secs(1000)), Verdict::Fine);
        let inner = g.0.clone();
        drop(g);
        assert_eq!(inner.with(|t| (t.in_flight, t.head_since)), (0, None));
    }
}
