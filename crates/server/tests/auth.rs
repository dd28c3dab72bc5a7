//! Access control (issue #24, Auth), against servers on 127.0.0.1: API key on everything but
//! `/health`, the admin key (or an explicit opt-in) for `load_weights`, JSON content type,
//! `Host` / `Origin` checks, weights only from under the root (one answer for everything
//! outside it, existing or not, symlinks included), strictly increasing policy versions.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::body::Bytes;
use candle_core::{DType, Device};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lockstep_model::MoeCausalLm;
use lockstep_server::{start, Security, ServerConfig};
use serde_json::{json, Value};

const KEY: &str = "sk-user-3f9a";
const ADMIN: &str = "sk-admin-77c1";

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The server's error format, with `status`; the message.
    fn error(&self, status: u16, what: &str) -> String {
        assert_eq!(self.status, status, "{what}: {}", String::from_utf8_lossy(&self.body));
        let v = self.json();
        let e = v["error"].as_object().unwrap_or_else(|| panic!("{what}: an error body: {v}"));
        for k in ["message", "type", "param", "code"] {
            assert!(e.contains_key(k), "{what}: error.{k} in {v}");
        }
        let msg = e["message"].as_str().unwrap().to_string();
        for secret in [KEY, ADMIN] {
            assert!(!msg.contains(secret), "{what}: a key echoed: {msg}");
        }
        msg
    }
}

/// One request on a fresh connection with exactly these headers (none added).
async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut b = hyper::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = sender.send_request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        Reply { status, headers, body }
    };
    tokio::time::timeout(Duration::from_secs(120), fut).await.expect("request timed out")
}

const JSON: (&str, &str) = ("content-type", "application/json");
const HOST: (&str, &str) = ("host", "localhost");

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
}

/// `POST /v1/load_weights` as the admin.
async fn load(addr: SocketAddr, body: &Value) -> Reply {
    send(addr, "POST", "/v1/load_weights", &[HOST, JSON, ("authorization", &bearer(ADMIN))], &body.to_string()).await
}

fn save_model(dir: &Path, seed: u64) {
    MoeCausalLm::embedded_default(seed, DType::F32, &Device::Cpu).unwrap().save(dir).unwrap();
}

fn cfg(security: Security) -> ServerConfig {
    ServerConfig { security, ..ServerConfig::default() }
}

fn keyed(root: &Path) -> Security {
    Security { api_key: Some(KEY.into()), admin_key: Some(ADMIN.into()), weights_root: Some(root.to_path_buf()), ..Security::strict() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_every_endpoint_but_health() {
    let root = tempfile::tempdir().unwrap();
    let srv = start(&cfg(keyed(root.path())), "127.0.0.1:0").await.unwrap();
    let a = srv.addr;
    let user = bearer(KEY);
    let gen = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    // refused: no key, a wrong key, another scheme, the admin key; unknown routes too
    for (method, path, body) in [("GET", "/v1/models", ""), ("GET", "/metrics", ""), ("POST", "/v1/completions", gen.as_str()), ("POST", "/v1/chat/completions", chat.as_str()), ("GET", "/v1/nothing", "")] {
        for auth in [None, Some("Bearer sk-wrong".to_string()), Some(format!("Basic {KEY}")), Some(bearer(ADMIN)), Some("Bearer".to_string())] {
            let mut h = vec![HOST, JSON];
            if let Some(a) = auth.as_deref() {
                h.push(("authorization", a));
            }
            let r = send(a, method, path, &h, body).await;
            r.error(401, &format!("{method} {path} with {auth:?}"));
            assert_eq!(r.json()["error"]["type"], "authentication_error");
            assert_eq!(r.headers.get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
        }
    }
    // accepted with the key (any case of the scheme)
    assert_eq!(send(a, "GET", "/v1/models", &[HOST, ("authorization", &user)], "").await.json()["data"][0]["id"], "default");
    assert_eq!(send(a, "GET", "/metrics", &[HOST, ("authorization", &format!("bearer {KEY}"))], "").await.status, 200);
    let r = send(a, "POST", "/v1/completions", &[HOST, JSON, ("authorization", &user)], &gen).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["choices"][0]["token_ids"].as_array().unwrap().len(), 2);
    assert_eq!(send(a, "POST", "/v1/chat/completions", &[HOST, JSON, ("authorization", &user)], &chat).await.status, 200);
    assert_eq!(send(a, "GET", "/v1/nothing", &[HOST, ("authorization", &user)], "").await.status, 404);
    // /health stays open
    let h = send(a, "GET", "/health", &[HOST], "").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_weights_needs_the_admin_key_and_json() {
    let root = tempfile::tempdir().unwrap();
    save_model(&root.path().join("ckpt"), 1);
    let body = json!({"path": "ckpt", "version": 1}).to_string();
    let srv = start(&cfg(keyed(root.path())), "127.0.0.1:0").await.unwrap();
    let a = srv.addr;
    for auth in [None, Some(bearer(KEY)), Some("Bearer sk-wrong".to_string())] {
        let mut h = vec![HOST, JSON];
        if let Some(x) = auth.as_deref() {
            h.push(("authorization", x));
        }
        send(a, "POST", "/v1/load_weights", &h, &body).await.error(401, &format!("load_weights with {auth:?}"));
    }
    // the admin key, but not JSON
    let admin = bearer(ADMIN);
    for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/jsonx")] {
        let mut h = vec![HOST, ("authorization", admin.as_str())];
        if let Some(c) = ct {
            h.push(("content-type", c));
        }
        let r = send(a, "POST", "/v1/load_weights", &h, &body).await;
        r.error(415, &format!("content type {ct:?}"));
    }
    assert_eq!(send(a, "GET", "/health", &[HOST], "").await.json()["policy_version"], 0, "nothing loaded");
    let r = send(a, "POST", "/v1/load_weights", &[HOST, ("content-type", "application/json; charset=utf-8"), ("authorization", &admin)], &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["policy_version"], 1);
    srv.shutdown().await;

    // no admin key: disabled, saying how to enable it ...
    let srv = start(&cfg(Security { api_key: Some(KEY.into()), weights_root: Some(root.path().into()), ..Security::strict() }), "127.0.0.1:0").await.unwrap();
    for auth in [bearer(KEY), bearer(ADMIN)] {
        let r = send(srv.addr, "POST", "/v1/load_weights", &[HOST, JSON, ("authorization", &auth)], &body).await;
        let msg = r.error(403, "load_weights without an admin key");
        assert!(msg.contains("--admin-key") && msg.contains("--allow-unauthenticated-load-weights"), "{msg}");
    }
    srv.shutdown().await;
    // ... unless explicitly allowed (then the API key, as everywhere)
    let open = Security { api_key: Some(KEY.into()), weights_root: Some(root.path().into()), allow_unauthenticated_load_weights: true, ..Security::strict() };
    let srv = start(&cfg(open), "127.0.0.1:0").await.unwrap();
    send(srv.addr, "POST", "/v1/load_weights", &[HOST, JSON], &body).await.error(401, "opted in, no API key");
    let r = send(srv.addr, "POST", "/v1/load_weights", &[HOST, JSON, ("authorization", &bearer(KEY))], &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_origins_are_refused() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let a = srv.addr;
    let port = a.port().to_string();
    // DNS rebinding: a name resolving to 127.0.0.1 reaches the socket with its own Host
    for host in ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2", ""] {
        let r = send(a, "GET", "/health", &[("host", host)], "").await;
        let msg = r.error(421, &format!("Host {host:?}"));
        assert!(msg.contains("--allowed-hosts"), "{msg}");
        send(a, "POST", "/v1/load_weights", &[("host", host), JSON], r#"{"path": "/tmp"}"#).await.error(421, "load_weights");
    }
    send(a, "GET", "/health", &[], "").await.error(421, "no Host");
    for host in ["localhost".to_string(), format!("localhost:{port}"), format!("127.0.0.1:{port}"), "LOCALHOST.".to_string(), format!("[::1]:{port}")] {
        assert_eq!(send(a, "GET", "/health", &[("host", &host)], "").await.status, 200, "Host {host}");
    }
    // a browser's cross-origin request (CSRF): Host is fine, Origin is not
    for origin in ["http://evil.example", "https://evil.example:8000", "null", "garbage"] {
        send(a, "POST", "/v1/completions", &[HOST, JSON, ("origin", origin)], r#"{"prompt": "hi", "max_tokens": 1}"#).await.error(403, &format!("Origin {origin}"));
    }
    let same = format!("http://localhost:{port}");
    assert_eq!(send(a, "POST", "/v1/completions", &[HOST, JSON, ("origin", &same)], r#"{"prompt": "hi", "max_tokens": 1}"#).await.status, 200);
    srv.shutdown().await;
    // --allowed-hosts names more, `*` any
    let srv = start(&cfg(Security { allowed_hosts: vec!["Rollout.Internal".into()], ..Security::open() }), "127.0.0.1:0").await.unwrap();
    assert_eq!(send(srv.addr, "GET", "/health", &[("host", "rollout.internal:8000")], "").await.status, 200);
    send(srv.addr, "GET", "/health", &[("host", "evil.example")], "").await.error(421, "not named");
    srv.shutdown().await;
    let srv = start(&cfg(Security { allowed_hosts: vec!["*".into()], ..Security::open() }), "127.0.0.1:0").await.unwrap();
    assert_eq!(send(srv.addr, "GET", "/health", &[("host", "anything.example")], "").await.status, 200);
    srv.shutdown().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_root_get_one_answer() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    save_model(&root.join("ckpt"), 1);
    save_model(&outside, 2); // a valid checkpoint, just not under the root
    symlink(&outside, root.join("escape")).unwrap();
    symlink(tmp.path().join("missing"), root.join("dangling")).unwrap();
    // a checkpoint directory inside the root whose weights file links outside
    let sneaky = root.join("sneaky");
    std::fs::create_dir(&sneaky).unwrap();
    for e in std::fs::read_dir(&outside).unwrap() {
        let p = e.unwrap().path();
        symlink(&p, sneaky.join(p.file_name().unwrap())).unwrap();
    }
    let srv = start(&cfg(keyed(&root)), "127.0.0.1:0").await.unwrap();
    let a = srv.addr;
    let outside_s = outside.display().to_string();
    let cases = [
        outside_s.clone(),                                   // exists, outside
        tmp.path().join("missing").display().to_string(),    // does not exist, outside
        "/etc".to_string(),                                  // exists, not a checkpoint
        "/nonexistent/checkpoint".to_string(),               // does not exist
        "../outside".to_string(),                            // relative, climbing out
        root.join("ckpt/../../outside").display().to_string(),
        "escape".to_string(),                                // symlink escape
        root.join("escape").display().to_string(),
        "dangling".to_string(),                              // symlink to nothing
        "sneaky".to_string(),                                // files linking outside
        "missing-inside".to_string(),                        // does not exist, inside
        String::new(),
    ];
    let mut bodies = Vec::new();
    for p in &cases {
        let r = load(a, &json!({"path": p, "version": 1})).await;
        let msg = r.error(400, p);
        assert!(!msg.contains(&*root.to_string_lossy()) && !msg.contains(&*tmp.path().to_string_lossy()), "the root or a path echoed: {msg}");
        assert!(!msg.to_lowercase().contains("no such file"), "{msg}");
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one answer for all: {:?}", bodies.iter().map(|b| String::from_utf8_lossy(b)).collect::<Vec<_>>());
    assert_eq!(send(a, "GET", "/health", &[HOST], "").await.json()["policy_version"], 0, "nothing loaded");
    // under the root: by relative and by absolute path
    for (p, v) in [("ckpt".to_string(), 1), (root.join("ckpt").display().to_string(), 2)] {
        let r = load(a, &json!({"path": p, "version": v})).await;
        assert_eq!(r.status, 200, "{p}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["policy_version"], v);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_versions_strictly_increase_and_never_wrap() {
    let root = tempfile::tempdir().unwrap();
    save_model(&root.path().join("ckpt"), 1);
    let srv = start(&cfg(keyed(root.path())), "127.0.0.1:0").await.unwrap();
    let a = srv.addr;
    let version = |v: Value| json!({"path": "ckpt", "version": v});
    // the first load must move past 0
    load(a, &version(json!(0))).await.error(409, "0 at 0");
    assert_eq!(load(a, &version(json!(5))).await.json()["policy_version"], 5);
    for (v, what) in [(5, "the same version"), (4, "backwards"), (0, "back to 0")] {
        let r = load(a, &version(json!(v))).await;
        r.error(409, what);
        assert_eq!(r.json()["error"]["param"], "version");
    }
    // none given: current + 1
    assert_eq!(load(a, &json!({"path": "ckpt"})).await.json()["policy_version"], 6);
    assert_eq!(load(a, &version(json!(u64::MAX))).await.json()["policy_version"], u64::MAX);
    // u64::MAX + 1: neither implicitly (wrapping to 0) nor as a number
    load(a, &json!({"path": "ckpt"})).await.error(409, "current + 1 at u64::MAX");
    load(a, &version(json!(u64::MAX))).await.error(409, "u64::MAX again");
    let r = send(a, "POST", "/v1/load_weights", &[HOST, JSON, ("authorization", &bearer(ADMIN))], r#"{"path": "ckpt", "version": 18446744073709551616}"#).await;
    r.error(400, "u64::MAX + 1 as a number");
    load(a, &version(json!(-1))).await.error(400, "negative");
    assert_eq!(send(a, "GET", "/health", &[HOST], "").await.json()["policy_version"], u64::MAX);
    srv.shutdown().await;

    // opted in to same-version reloads (the RL loop's client today): equal passes, lower does not
    let same = Security { allow_same_version: true, ..keyed(root.path()) };
    let srv = start(&cfg(same), "127.0.0.1:0").await.unwrap();
    assert_eq!(load(srv.addr, &version(json!(0))).await.json()["policy_version"], 0);
    assert_eq!(load(srv.addr, &version(json!(3))).await.json()["policy_version"], 3);
    assert_eq!(load(srv.addr, &version(json!(3))).await.json()["policy_version"], 3);
    load(srv.addr, &version(json!(2))).await.error(409, "backwards with same-version reloads");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_be_meant_are_refused_at_start() {
    let bad = [
        Security { api_key: Some(String::new()), ..Security::strict() },
        Security { admin_key: Some(String::new()), ..Security::strict() },
        Security { api_key: Some(KEY.into()), admin_key: Some(KEY.into()), ..Security::strict() },
        Security { weights_root: Some("/nonexistent/root".into()), ..Security::strict() },
    ];
    for s in bad {
        let e = start(&cfg(s.clone()), "127.0.0.1:0").await.err().unwrap_or_else(|| panic!("{s:?} started"));
        assert!(!e.to_string().contains(KEY), "{e}");
    }
}
