//! Admission (issue #24): connections beyond `max_connections` get a fast 503 JSON refusal
//! (with `Retry-After`) and are closed; `/health` says `overloaded` at a limit; under a burst
//! beyond `max_waiting` every request is either served whole or refused with 503 + Retry-After,
//! none lost.

mod common;

use std::time::Duration;

use common::{get, metric, post, raw, raw_json, until};
use lockstep_server::{start, Limits, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(120);

/// One request and its whole response on an open keep-alive connection.
async fn exchange(s: &mut tokio::net::TcpStream, req: &str) -> String {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf)).await.expect("response").unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())).unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_at_once() {
    let limits = Limits { max_connections: 2, idle_timeout: Some(Duration::from_secs(600)), ..Limits::default() };
    let srv = start(&ServerConfig { limits, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    // two connections held open (accepted in order, so they take both slots)
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(addr).await.unwrap();
    // (once the second is accepted too) health on the first says overloaded
    let t0 = std::time::Instant::now();
    loop {
        let h = exchange(&mut a, "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        if raw_json(&h)["status"] == "overloaded" {
            break;
        }
        assert!(t0.elapsed() < LIMIT, "{h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // a third: 503 JSON naming max_connections, Retry-After, closed
    let r = raw(addr, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", LIMIT).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{r}");
    let e = raw_json(&r);
    assert_eq!(e["error"]["code"], "max_connections", "{r}");
    assert!(e["error"]["message"].as_str().unwrap().contains("max_connections"), "{r}");
    // a probe over the limit still learns the server is alive
    let p = raw(addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", LIMIT).await;
    assert!(p.starts_with("HTTP/1.1 200"), "{p}");
    assert_eq!(raw_json(&p)["status"], "overloaded");
    // a slot frees: served again
    drop(b);
    until("a free connection slot", LIMIT, || async {
        let r = raw(addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", LIMIT).await;
        r.starts_with("HTTP/1.1 200") && raw_json(&r)["connections"] == 2
    })
    .await;
    // read the count over the connection held open: a fresh one could race the slot the
    // probe above has just released
    let m = exchange(&mut a, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let body = m.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let refused = common::sample(body, "lockstep_refused_connections_total").unwrap_or_else(|| panic!("no lockstep_refused_connections_total in {m}"));
    assert!(refused >= 2.0, "{m}");
    drop(a);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_overloaded_when_the_queue_is_full() {
    let srv = start(&ServerConfig { max_running: 1, max_waiting: 2, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let h = get(addr, "/health").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(h.json()["max_waiting"], 2);
    // a long request of two samples: one runs, one waits; a third sample fills the queue
    let long = json!({"prompt": "ab", "n": 2, "max_tokens": 1000, "ignore_eos": true});
    let first = tokio::spawn(async move { post(addr, "/v1/completions", &long).await });
    until("the first request running", LIMIT, || async { metric(addr, "lockstep_running_sequences").await == 1.0 && metric(addr, "lockstep_waiting_sequences").await == 1.0 }).await;
    assert_eq!(get(addr, "/health").await.json()["status"], "ok");
    let long = json!({"prompt": "cd", "max_tokens": 1000, "ignore_eos": true});
    let second = tokio::spawn(async move { post(addr, "/v1/completions", &long).await });
    until("health: overloaded", LIMIT, || async {
        let h = get(addr, "/health").await;
        h.status == 200 && h.json()["status"] == "overloaded"
    })
    .await;
    // the clients go away: their sequences are dropped and the server is ok again
    first.abort();
    second.abort();
    until("health: ok", LIMIT, || async { get(addr, "/health").await.json()["status"] == "ok" }).await;
    until("an empty engine", LIMIT, || async { metric(addr, "lockstep_running_sequences").await == 0.0 && metric(addr, "lockstep_kv_blocks_held").await == 0.0 }).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_served_or_refused_and_none_is_lost() {
    let srv = start(&ServerConfig { max_running: 2, max_waiting: 3, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let tasks: Vec<_> = (0..12)
        .map(|i| tokio::spawn(async move { post(addr, "/v1/completions", &json!({"prompt": format!("p{i}"), "max_tokens": 8, "ignore_eos": true, "seed": i})).await }))
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => {
                let v = r.json();
                assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 8, "{v}");
                ok += 1;
            }
            503 => {
                assert_eq!(r.json()["error"]["code"], "max_waiting");
                assert_eq!(r.header("retry-after"), "1");
                refused += 1;
            }
            s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert_eq!(ok + refused, 12);
    assert!(ok >= 1);
    // every accepted request came back whole; nothing is left in the engine
    until("an empty engine", LIMIT, || async { metric(addr, "lockstep_running_sequences").await == 0.0 && metric(addr, "lockstep_waiting_sequences").await == 0.0 }).await;
    srv.shutdown().await;
}
