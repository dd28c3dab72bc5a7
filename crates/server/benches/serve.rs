//! Generated tokens/s on the embedded default (batch-invariant kernels), batch 1 and 16, route
//! capture on and off: the engine alone (`Engine::generate`) and end to end through the server
//! on loopback (concurrent non-streaming requests; capture on includes encoding the traces).
//! `cargo bench -p lockstep-server --bench serve` (env `BENCH_TOKENS`, `BENCH_REPS`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use candle_core::{DType, Device};
use lockstep_engine::{Engine, Request, SamplingParams};
use lockstep_model::{Kernels, MoeCausalLm};
use lockstep_server::{start, ServerConfig};
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn prompt(i: usize) -> Vec<u32> {
    (0..8).map(|j| ((i * 31 + j * 7 + 1) % 256) as u32).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn engine_tps(batch: usize, capture: bool, tokens: usize, reps: usize) -> f64 {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    let mut e = Engine::new(m);
    e.set_capture_routes(capture).unwrap();
    let reqs: Vec<Request> = (0..batch)
        .map(|i| Request { prompt: prompt(i), params: SamplingParams { seed: i as u64, max_tokens: tokens, ..SamplingParams::default() } })
        .collect();
    e.generate(reqs.clone()).unwrap(); // warm-up
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let done = e.generate(reqs.clone()).unwrap();
                let n: usize = done.iter().map(|c| c.tokens.len()).sum();
                n as f64 / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

async fn server_tps(batch: usize, capture: bool, tokens: usize, reps: usize) -> (f64, f64) {
    let srv = start(&ServerConfig { capture_routes: capture, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let mut rates = Vec::new();
    let mut bytes = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        let tasks: Vec<_> = (0..batch)
            .map(|i| {
                let b = json!({"prompt": prompt(i), "max_tokens": tokens, "seed": i, "temperature": 1.0});
                tokio::spawn(async move { common::post(addr, "/v1/completions", &b).await })
            })
            .collect();
        let (mut n, mut route_bytes) = (0usize, 0usize);
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200);
            let v = r.json();
            n += v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
            route_bytes += v["choices"][0]["routes"].as_str().map_or(0, str::len);
        }
        if rep > 0 {
            rates.push(n as f64 / t.elapsed().as_secs_f64());
            bytes.push(route_bytes as f64 / batch as f64);
        }
    }
    srv.shutdown().await;
    (median(rates), median(bytes))
}

fn main() {
    let tokens = env("BENCH_TOKENS", 64);
    let reps = env("BENCH_REPS", 5);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("generated tokens/s, embedded default, invariant kernels, {tokens} tokens per request, median of {reps}");
    println!("{:<8} {:>6} {:>14} {:>14} {:>10}   {:>14} {:>14} {:>10} {:>16}", "", "batch", "engine cap on", "engine off", "overhead", "server cap on", "server off", "overhead", "routes b64/resp");
    for batch in [1usize, 16] {
        let (e_on, e_off) = (engine_tps(batch, true, tokens, reps), engine_tps(batch, false, tokens, reps));
        let ((s_on, b64), (s_off, _)) = rt.block_on(async { (server_tps(batch, true, tokens, reps).await, server_tps(batch, false, tokens, reps).await) });
        let pct = |on: f64, off: f64| 100.0 * (off - on) / off;
        println!(
            "{:<8} {batch:>6} {e_on:>14.1} {e_off:>14.1} {:>9.1}%   {s_on:>14.1} {s_off:>14.1} {:>9.1}% {b64:>16.0}",
            "",
            pct(e_on, e_off),
            pct(s_on, s_off)
        );
    }
}
