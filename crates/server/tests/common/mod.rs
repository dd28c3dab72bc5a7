//! A loopback HTTP/1.1 client for the tests and the benchmark (hyper's connection API), and
//! helpers to read lockstep's fields back from responses.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lockstep_engine::{Completion, FinishReason};
use lockstep_trace::{Reader, RouteTrace};
use serde_json::Value;

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: hyper::HeaderMap,
}

impl Reply {
    /// A header's value as text ("" if absent).
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of an SSE body, which must end with `[DONE]`.
    pub fn events(&self) -> Vec<Value> {
        let text = String::from_utf8_lossy(&self.body);
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "stream ends with [DONE]: {text}");
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
    }
}

/// One request on a fresh connection, within 120 s.
pub async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        Reply { status, body, headers }
    };
    tokio::time::timeout(Duration::from_secs(120), fut).await.expect("request timed out")
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    call(addr, "POST", path, &body.to_string()).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, "GET", path, "").await
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The choice's route trace (base64 `.lstrace` file with one sequence).
pub fn trace(choice: &Value) -> RouteTrace {
    let b = base64::engine::general_purpose::STANDARD.decode(choice["routes"].as_str().expect("routes")).unwrap();
    let r = Reader::from_bytes(b).unwrap();
    assert_eq!(r.len(), 1);
    r.get(0).unwrap()
}

/// A choice as the engine's `Completion` (ids and probabilities from the trace, which must
/// start at token 0; logprobs from `logprobs`), for re-scoring with the trainer's forward.
pub fn completion(choice: &Value, logprobs: &[f32]) -> Completion {
    let t = trace(choice);
    let prompt = ids(&choice["prompt_token_ids"]);
    let tokens = ids(&choice["token_ids"]);
    assert_eq!(t.num_tokens(), prompt.len() + tokens.len());
    let policy_version = t.meta().policy_version;
    Completion {
        id: 0,
        prompt,
        tokens,
        logprobs: logprobs.to_vec(),
        routes: Some(t),
        top_logprobs: Vec::new(),
        finish: if choice["finish_reason"] == "stop" { FinishReason::Stop } else { FinishReason::Length },
        policy_version,
    }
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// A current-vLLM `routed_experts` string (`np.load(io.BytesIO(base64.b64decode(s)))`):
/// uint8 `(N - 1 - start, num_hidden_layers = 4, top_k = 2)`, the MoE columns (0, 1, 3) equal to
/// the full trace's rows from `start`, the dense column 2 zero.
pub fn check_vllm_routes(s: &str, full: &RouteTrace, start: usize) {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).expect("base64");
    let arr = lockstep_trace::npy::read_npy(&bytes).expect(".npy");
    assert_eq!(arr.dtype, lockstep_trace::npy::NpyDtype::U8);
    let n = full.num_tokens();
    assert_eq!(arr.shape, vec![n - 1 - start, 4, 2]);
    for r in 0..n - 1 - start {
        for (c, layer) in [(0usize, Some(0usize)), (1, Some(1)), (2, None), (3, Some(2))] {
            let cell: Vec<u32> = arr.data[(r * 4 + c) * 2..(r * 4 + c + 1) * 2].iter().map(|&x| x as u32).collect();
            match layer {
                Some(l) => assert_eq!(cell, full.row_u32(start + r, l).unwrap(), "row {r} column {c}"),
                None => assert_eq!(cell, vec![0, 0], "dense column"),
            }
        }
    }
}

/// The value of an unlabelled Prometheus sample (`name value`) in `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
    sample(&text, name).unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// `name value` (or `name{labels} value`, the whole `name{labels}` given) in Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Poll `cond` every 20 ms until it holds (panics after `limit`).
pub async fn until<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut cond: impl FnMut() -> F) {
    let t0 = std::time::Instant::now();
    while !cond().await {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP/1.1 exchange: write `req`, read until the server closes (within `limit`).
pub async fn raw(addr: SocketAddr, req: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut out)).await.expect("the server did not close the connection").ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw response.
pub fn raw_json(resp: &str) -> Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {resp}"))
}
