//! Admission control: a request that would queue more than `max_waiting` sequences behind the
//! running batch gets a 503 naming `max_waiting` (never an unbounded queue); requests within the
//! limit are served as before. The refusal carries `Retry-After` and `code: max_waiting`.

mod common;

use common::post;
use lockstep_server::{start, ServerConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_beyond_max_waiting_is_refused_by_name() {
    let srv = start(&ServerConfig { max_running: 1, max_waiting: 2, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    // n = 3 sequences submitted at once: 3 queued > 2
    let r = post(addr, "/v1/completions", &json!({"prompt": "ab", "n": 3, "max_tokens": 2})).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("max_waiting") && msg.contains("at most 2"), "{msg}");
    assert_eq!(r.json()["error"]["code"], "max_waiting");
    assert_eq!(r.header("retry-after"), "1");
    // within the limit: served
    let ok = post(addr, "/v1/completions", &json!({"prompt": "ab", "n": 2, "max_tokens": 2})).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["choices"].as_array().unwrap().len(), 2);
}
