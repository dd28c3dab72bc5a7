//! `ServerConfig::sampler` (`lockstep serve --sampler gumbel|exact`): the device sampler
//! (Gumbel-max; here on the CPU, where the exact host sampler is the default) serves seeded
//! requests reproducibly — the same seed, the same tokens, alone or beside other requests — with
//! log-probabilities, and a different stream from the exact sampler's.

mod common;

use common::post;
use lockstep_engine::Sampler;
use lockstep_server::{start, ServerConfig};
use serde_json::{json, Value};

async fn tokens(addr: std::net::SocketAddr, seed: u64) -> (Vec<u64>, Vec<f64>) {
    let r = post(addr, "/v1/completions", &json!({"prompt": "12+34=", "max_tokens": 12, "seed": seed, "temperature": 1.0, "ignore_eos": true, "logprobs": 0})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let c = &r.json()["choices"][0];
    let ids = c["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let lps = c["logprobs"]["token_logprobs"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
    (ids, lps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_sampler_serves_seeded_requests_reproducibly() {
    let gumbel = start(&ServerConfig { sampler: Some(Sampler::Gumbel), ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let exact = start(&ServerConfig { sampler: Some(Sampler::Exact), ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let (a, lp) = tokens(gumbel.addr, 7).await;
    assert_eq!(a.len(), 12);
    assert_eq!(lp.len(), 12, "log-probabilities with every token");
    assert!(lp.iter().all(|x| x.is_finite() && *x <= 0.0), "{lp:?}");
    // the same seed beside other requests: the same tokens
    let g = gumbel.addr;
    let others: Vec<_> = (0..3u64).map(|s| tokio::spawn(async move { tokens(g, 100 + s).await })).collect();
    let (b, _) = tokens(gumbel.addr, 7).await;
    for o in others {
        o.await.unwrap();
    }
    assert_eq!(a, b, "a seeded request's tokens do not depend on the batch");
    let mut differs = false;
    for seed in 0..4u64 {
        differs |= tokens(gumbel.addr, seed).await.0 != tokens(exact.addr, seed).await.0;
    }
    assert!(differs, "the two samplers are different streams");
    gumbel.shutdown().await;
    exact.shutdown().await;
}
