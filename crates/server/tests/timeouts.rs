//! Slow clients (issue #24): headers sent byte by byte past `header_timeout` and connections
//! idle past `idle_timeout` are dropped, a body not finished within `body_timeout` gets a 408,
//! and a generation past `request_timeout` gets a 504 with its sequences aborted and their KV
//! blocks freed. Raw TCP clients; short bounds, generous waits (nothing asserts on speed).

mod common;

use std::time::Duration;

use common::{metric, post, raw, raw_json, until};
use lockstep_server::{start, Limits, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);

fn cfg(limits: Limits) -> ServerConfig {
    ServerConfig { limits, ..ServerConfig::default() }
}

/// Whether the server closes `s` within `limit` (a read ends or fails).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let t = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    t.await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_sent_byte_by_byte_are_cut_off() {
    let limits = Limits { header_timeout: Some(Duration::from_secs(1)), idle_timeout: Some(Duration::from_secs(600)), ..Limits::default() };
    let srv = start(&cfg(limits), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // 2,000 bytes at one per 50 ms: 100 s, far beyond the 1 s bound
    let head = format!("GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: {}\r\n\r\n", "a".repeat(2000));
    let writer = tokio::spawn(async move {
        for (i, b) in head.bytes().enumerate() {
            if wr.write_all(&[b]).await.is_err() {
                return Some(i);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    });
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(LIMIT, rd.read(&mut buf)).await.expect("the slow client was not dropped").unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer: {}", String::from_utf8_lossy(&buf[..n]));
    writer.abort();
    // a prompt client is served as ever
    let r = raw(addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", LIMIT).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let limits = Limits { idle_timeout: Some(Duration::from_secs(1)), ..Limits::default() };
    let srv = start(&cfg(limits), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    // never a byte
    let mut quiet = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut quiet, LIMIT).await);
    // a request answered, then nothing: keep-alive ends at the idle bound
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(LIMIT, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut s, LIMIT).await);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_body_gets_408() {
    let limits = Limits { body_timeout: Some(Duration::from_secs(1)), ..Limits::default() };
    let srv = start(&cfg(limits), "127.0.0.1:0").await.unwrap();
    // 100 bytes announced, 13 sent, then silence
    let r = raw(srv.addr, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": \"a", LIMIT).await;
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    let e = raw_json(&r);
    assert_eq!(e["error"]["code"], "body_timeout", "{r}");
    assert!(e["error"]["message"].as_str().unwrap().contains("body_timeout"));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_aborted() {
    // 16 samples × 1,000 tokens: far more than 300 ms of work anywhere
    let limits = Limits { request_timeout: Some(Duration::from_millis(300)), ..Limits::default() };
    let srv = start(&ServerConfig { max_running: 16, ..cfg(limits) }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let body = json!({"prompt": "ab", "n": 16, "max_tokens": 1000, "ignore_eos": true});
    let r = post(addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    let empty = || async { metric(addr, "lockstep_running_sequences").await == 0.0 && metric(addr, "lockstep_waiting_sequences").await == 0.0 && metric(addr, "lockstep_kv_blocks_held").await == 0.0 };
    until("the sequences aborted, their blocks freed", LIMIT, empty).await;
    assert!(metric(addr, "lockstep_generation_tokens_total").await < 16_000.0);
    // streamed: an error event, no [DONE], and the engine empties again
    let r = post(addr, "/v1/completions", &json!({"prompt": "cd", "n": 16, "max_tokens": 1000, "ignore_eos": true, "stream": true})).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains("request_timeout") && !text.contains("[DONE]"), "{text}");
    until("the streamed sequences aborted", LIMIT, empty).await;
    assert!(metric(addr, "lockstep_generation_tokens_total").await < 32_000.0);
    srv.shutdown().await;
}
