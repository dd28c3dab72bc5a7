//! Graceful drain (issue #24), in process through the drain handle (what SIGTERM triggers in
//! `lockstep serve`): a streaming request in flight finishes whole, an idle keep-alive
//! connection is closed, new connections get 503 JSON `draining` (and `/health` 503
//! `{"status": "draining"}`), then the server returns.

mod common;

use std::time::Duration;

use common::{raw, raw_json};
use lockstep_server::{start, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_running_requests_and_refuses_new_ones() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    // an idle keep-alive connection
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(LIMIT, idle.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("\"ok\""));
    // a streaming request of 4 samples: its first event in, thousands of tokens to go
    let body = r#"{"prompt": "ab", "n": 4, "max_tokens": 1000, "ignore_eos": true, "stream": true}"#;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let drain = srv.drain_handle();
    drain.start();
    assert!(drain.is_draining());
    // new connections: refused with draining
    let r = raw(addr, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", LIMIT).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{r}");
    assert_eq!(raw_json(&r)["error"]["code"], "draining", "{r}");
    let h = raw(addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", LIMIT).await;
    assert!(h.starts_with("HTTP/1.1 503"), "{h}");
    assert_eq!(raw_json(&h)["status"], "draining");
    // the idle connection is closed
    let n = tokio::time::timeout(LIMIT, idle.read(&mut buf)).await.expect("idle connection closed").unwrap_or(0);
    assert_eq!(n, 0);
    // the stream finishes whole, then the connection closes
    tokio::time::timeout(LIMIT, s.read_to_end(&mut got)).await.expect("stream finished").unwrap();
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.contains("data: [DONE]"), "{text}");
    let tokens: usize = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["token_ids"].as_array().map(|a| a.len()))
        .sum();
    assert_eq!(tokens, 4000, "each final chunk carries its choice's every token id");
    // and the server has returned
    tokio::time::timeout(LIMIT, srv.wait()).await.expect("the server returned after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_drains_at_once() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    tokio::time::timeout(LIMIT, srv.shutdown()).await.expect("drained");
    // the listener is gone
    assert!(TcpStream::connect(addr).await.is_err());
}
