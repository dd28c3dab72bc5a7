//! Who may talk to the server and what `load_weights` may read (issue #24, Auth):
//!
//! * an API key (`Authorization: Bearer <key>`, as vLLM and the OpenAI clients send it) on every
//!   endpoint but `GET /health`;
//! * a separate admin key for `POST /v1/load_weights`; without one, `load_weights` is disabled
//!   unless explicitly allowed;
//! * the `Host` header (and `Origin`, when a browser sends one) checked against the bound
//!   address and localhost, unless `allowed_hosts` says otherwise (DNS rebinding, CSRF);
//! * `load_weights` reads only under a weights root: canonicalised, symlink escapes included,
//!   with one generic error for anything outside it.
//!
//! Error messages never echo configured values (keys, the root, the allowed hosts).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Result, ServerError};

/// The access settings of a server.
///
/// [`Security::default`] is [`Security::open`], the behaviour before these checks existed minus
/// the parts nothing relied on (the `Host` check and the JSON content type are always on):
/// for servers started in process by tests. `lockstep serve` starts from [`Security::strict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// required as `Authorization: Bearer <key>` on every endpoint but `GET /health`
    pub api_key: Option<String>,
    /// required as `Authorization: Bearer <key>` on `POST /v1/load_weights`
    pub admin_key: Option<String>,
    /// without an admin key, serve `load_weights` anyway (to anyone holding the API key, or to
    /// anyone when there is none); off, it answers 403
    pub allow_unauthenticated_load_weights: bool,
    /// further names accepted in `Host` / `Origin` (beside localhost, 127.0.0.1, ::1 and the
    /// bound address); `*` accepts any
    pub allowed_hosts: Vec<String>,
    /// `load_weights` reads only checkpoint directories under this directory (relative request
    /// paths are taken from it); `None`: anywhere
    pub weights_root: Option<PathBuf>,
    /// accept a `load_weights` whose version equals the current one (a reload under the same
    /// version, as the RL loop's remote client does today); lower versions are always refused
    pub allow_same_version: bool,
}

impl Security {
    /// No keys, `load_weights` open, weights from anywhere, same-version reloads accepted.
    pub fn open() -> Self {
        Self { api_key: None, admin_key: None, allow_unauthenticated_load_weights: true, allowed_hosts: Vec::new(), weights_root: None, allow_same_version: true }
    }

    /// No keys yet, `load_weights` disabled, weights only under the current directory, versions
    /// strictly increasing.
    pub fn strict() -> Self {
        Self { api_key: None, admin_key: None, allow_unauthenticated_load_weights: false, allowed_hosts: Vec::new(), weights_root: Some(PathBuf::from(".")), allow_same_version: false }
    }

    /// Refuse settings that cannot be what was meant (empty keys, one key for both roles).
    pub fn validate(&self) -> Result<()> {
        if self.api_key.as_deref() == Some("") {
            return Err(ServerError::Config("the API key is empty (--api-key / LOCKSTEP_API_KEY)".into()));
        }
        if self.admin_key.as_deref() == Some("") {
            return Err(ServerError::Config("the admin key is empty (--admin-key / LOCKSTEP_ADMIN_KEY)".into()));
        }
        if self.api_key.is_some() && self.api_key == self.admin_key {
            return Err(ServerError::Config("the admin key must differ from the API key".into()));
        }
        if self.allowed_hosts.iter().any(|h| h.trim().is_empty()) {
            return Err(ServerError::Config("--allowed-hosts: an empty name".into()));
        }
        Ok(())
    }
}

impl Default for Security {
    fn default() -> Self {
        Self::open()
    }
}

/// What the middleware and `load_weights` check against, fixed once the socket is bound.
#[derive(Debug)]
pub struct Guard {
    pub security: Security,
    /// lower-case host names and addresses accepted in `Host` / `Origin`; `None`: any
    hosts: Option<Vec<String>>,
    /// the canonical weights root
    pub root: Option<PathBuf>,
}

impl Guard {
    /// `bound`: the listening address; `host`: the host part the server was asked to bind
    /// (a name there is accepted too).
    pub fn new(security: Security, bound: Option<SocketAddr>, host: Option<&str>) -> Result<Self> {
        security.validate()?;
        let root = match &security.weights_root {
            None => None,
            Some(r) => Some(std::fs::canonicalize(r).map_err(|e| ServerError::Io { what: "--weights-root".into(), source: e })?),
        };
        if let Some(r) = &root {
            if !r.is_dir() {
                return Err(ServerError::Config("--weights-root: not a directory".into()));
            }
        }
        let hosts = if security.allowed_hosts.iter().any(|h| h.trim() == "*") {
            None
        } else {
            let mut h: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|s| s.to_string()).collect();
            if let Some(a) = bound {
                if !a.ip().is_unspecified() {
                    h.push(a.ip().to_string());
                }
            }
            if let Some(name) = host.map(host_name) {
                if !name.is_empty() && !name.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
                    h.push(name);
                }
            }
            h.extend(security.allowed_hosts.iter().map(|s| host_name(s.trim())));
            Some(h)
        };
        Ok(Self { security, hosts, root })
    }

    fn host_allowed(&self, name: &str) -> bool {
        match &self.hosts {
            None => true,
            Some(h) => h.iter().any(|a| a == name),
        }
    }

    /// The `Host` check, then (for a browser's cross-origin request) the `Origin` check.
    fn check_origin(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        if self.hosts.is_none() {
            return Ok(());
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(host_name);
        if !host.is_some_and(|h| self.host_allowed(&h)) {
            return Err(ApiError::misdirected("the Host header names no address this server answers for; start it with --allowed-hosts to accept other names"));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let name = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| host_name(rest.split('/').next().unwrap_or("")));
            if !name.is_some_and(|n| self.host_allowed(&n)) {
                return Err(ApiError::forbidden("origin_not_allowed", "cross-origin requests are refused; start the server with --allowed-hosts to accept this origin"));
            }
        }
        Ok(())
    }

    /// The keys: `load_weights` wants the admin key (or is disabled), everything else but
    /// `GET /health` the API key.
    fn check_keys(&self, method: &Method, path: &str, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        if path == "/health" && (method == Method::GET || method == Method::HEAD) {
            return Ok(());
        }
        let token = bearer(headers);
        if path == "/v1/load_weights" {
            match &self.security.admin_key {
                Some(k) => {
                    return if token.is_some_and(|t| ct_eq(t.as_bytes(), k.as_bytes())) {
                        Ok(())
                    } else {
                        Err(ApiError::unauthorized("load_weights needs the admin key as `Authorization: Bearer <key>`"))
                    };
                }
                None if !self.security.allow_unauthenticated_load_weights => {
                    return Err(ApiError::forbidden(
                        "load_weights_disabled",
                        "load_weights is disabled: start the server with --admin-key (or LOCKSTEP_ADMIN_KEY) and send that key as `Authorization: Bearer <key>`, or with --allow-unauthenticated-load-weights",
                    ));
                }
                None => {} // explicitly open: the API key (if any) as for the other endpoints
            }
        }
        match &self.security.api_key {
            None => Ok(()),
            Some(k) if token.is_some_and(|t| ct_eq(t.as_bytes(), k.as_bytes())) => Ok(()),
            Some(_) if token.is_none() => Err(ApiError::unauthorized("missing API key: send it as `Authorization: Bearer <key>`")),
            Some(_) => Err(ApiError::unauthorized("invalid API key")),
        }
    }

    /// A requested checkpoint directory, canonicalised and checked to lie (with every entry in
    /// it) under the weights root. Anything else, whether it exists or not, gets one message.
    pub fn checkpoint_dir(&self, requested: &str) -> std::result::Result<PathBuf, ApiError> {
        let generic = || ApiError::invalid("path", "not a checkpoint directory under the weights root");
        if requested.is_empty() || requested.contains('\0') {
            return Err(generic());
        }
        let p = Path::new(requested);
        let p = match &self.root {
            Some(r) if p.is_relative() => r.join(p),
            _ => p.to_path_buf(),
        };
        let canon = std::fs::canonicalize(&p).map_err(|_| generic())?;
        let inside = |c: &Path| self.root.as_ref().is_none_or(|r| c.starts_with(r));
        if !inside(&canon) || !canon.is_dir() {
            return Err(generic());
        }
        if self.root.is_some() {
            // the files in it too: a symlinked weights file must not reach outside the root
            for entry in std::fs::read_dir(&canon).map_err(|_| generic())? {
                let entry = entry.map_err(|_| generic())?;
                let c = std::fs::canonicalize(entry.path()).map_err(|_| generic())?;
                if !inside(&c) {
                    return Err(generic());
                }
            }
        }
        Ok(canon)
    }

    /// A message about a file under the root, with the root itself left out.
    pub fn redact(&self, msg: &str) -> String {
        match &self.root {
            Some(r) => msg.replace(&*r.to_string_lossy(), "<weights-root>"),
            None => msg.to_string(),
        }
    }
}

/// The middleware: `Host` / `Origin`, then the keys.
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    if let Err(e) = g.check_origin(req.headers()).and_then(|()| g.check_keys(req.method(), req.uri().path(), req.headers())) {
        return e.into_response();
    }
    next.run(req).await
}

/// `Content-Type: application/json` (parameters such as `charset` allowed), else 415.
pub fn require_json(headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type("the body must be JSON, sent with `Content-Type: application/json`"))
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Equality in time independent of where the bytes differ (the length may show).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The host of a `Host` value (or of an authority): no port, no brackets, lower case, no
/// trailing dot.
fn host_name(v: &str) -> String {
    let v = v.trim();
    let h = if let Some(rest) = v.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if v.matches(':').count() > 1 {
        v // a bare IPv6 address
    } else {
        v.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map(|(h, _)| h).unwrap_or(v)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether serving on `addr` reaches beyond this machine.
pub fn beyond_loopback(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Loud warnings about settings that expose the server.
pub fn warn_exposure(s: &Security, addr: &SocketAddr) {
    if !beyond_loopback(addr) {
        return;
    }
    if s.api_key.is_none() {
        let msg = format!("listening on {addr}, beyond loopback, WITHOUT an API key: anyone who can reach this address can use the server; set --api-key or LOCKSTEP_API_KEY");
        tracing::warn!("{msg}");
        eprintln!("\n*** WARNING: {msg} ***\n");
    }
    if s.admin_key.is_none() && s.allow_unauthenticated_load_weights {
        let msg = format!("listening on {addr} with load_weights open to every client holding the API key (or to anyone without one): set --admin-key instead of --allow-unauthenticated-load-weights");
        tracing::warn!("{msg}");
        eprintln!("*** WARNING: {msg} ***");
    }
    if !s.allowed_hosts.iter().any(|h| h.trim() == "*") && addr.ip().is_unspecified() {
        eprintln!("lockstep serve: only the Host names localhost, 127.0.0.1 and ::1 are accepted; name others with --allowed-hosts");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("localhost:8000"), "localhost");
        assert_eq!(host_name("LocalHost."), "localhost");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("::1"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("evil.com:8000"), "evil.com");
    }

    #[test]
    fn bearer_and_compare() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer  sk-1 ".parse().unwrap());
        assert_eq!(bearer(&h), Some("sk-1"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }
}
