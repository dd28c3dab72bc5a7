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

/// Tokens/s of `reqs` on an engine (after a warm-up run).
fn engine(capture: bool) -> Engine {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    let mut e = Engine::new(m);
    e.set_capture_routes(capture).unwrap();
    e
}

fn engine_run(e: &mut Engine, batch: usize, tokens: usize) -> f64 {
    let reqs: Vec<Request> = (0..batch)
        .map(|i| Request { prompt: prompt(i), params: SamplingParams { seed: i as u64, max_tokens: tokens, ..SamplingParams::default() } })
        .collect();
    let t = Instant::now();
    let done = e.generate(reqs).unwrap();
    let n: usize = done.iter().map(|c| c.tokens.len()).sum();
    n as f64 / t.elapsed().as_secs_f64()
}

/// `batch` concurrent requests; tokens/s and base64 route bytes per response.
async fn server_run(addr: std::net::SocketAddr, batch: usize, tokens: usize) -> (f64, f64) {
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
    (n as f64 / t.elapsed().as_secs_f64(), route_bytes as f64 / batch as f64)
}

/// Medians of capture-on and capture-off runs taken in alternation (so both see the same
/// machine load), and the median of the per-pair overheads.
struct Paired {
    on: Vec<f64>,
    off: Vec<f64>,
}

impl Paired {
    fn new() -> Self {
        Self { on: Vec::new(), off: Vec::new() }
    }
    fn overhead(&self) -> f64 {
        median(self.on.iter().zip(&self.off).map(|(on, off)| 100.0 * (off - on) / off).collect())
    }
}

fn main() {
    let tokens = env("BENCH_TOKENS", 64);
    let reps = env("BENCH_REPS", 9);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("generated tokens/s, embedded default, invariant kernels, {tokens} tokens per request; capture on / off alternated, medians of {reps}");
    println!("{:>5} {:>13} {:>12} {:>9}   {:>13} {:>12} {:>9} {:>15}", "batch", "engine on", "engine off", "overhead", "server on", "server off", "overhead", "routes b64/resp");
    let (mut e_on, mut e_off) = (engine(true), engine(false));
    let (s_on, s_off) = rt.block_on(async {
        (
            start(&ServerConfig { capture_routes: true, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap(),
            start(&ServerConfig { capture_routes: false, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap(),
        )
    });
    for batch in [1usize, 16] {
        let (mut e, mut s, mut b64) = (Paired::new(), Paired::new(), Vec::new());
        for rep in 0..=reps {
            let on = engine_run(&mut e_on, batch, tokens);
            let off = engine_run(&mut e_off, batch, tokens);
            let ((son, bytes), (soff, _)) = rt.block_on(async { (server_run(s_on.addr, batch, tokens).await, server_run(s_off.addr, batch, tokens).await) });
            if rep > 0 {
                // rep 0 warms up
                e.on.push(on);
                e.off.push(off);
                s.on.push(son);
                s.off.push(soff);
                b64.push(bytes);
            }
        }
        println!(
            "{batch:>5} {:>13.1} {:>12.1} {:>8.1}%   {:>13.1} {:>12.1} {:>8.1}% {:>15.0}",
            median(e.on.clone()),
            median(e.off.clone()),
            e.overhead(),
            median(s.on.clone()),
            median(s.off.clone()),
            s.overhead(),
            median(b64)
        );
    }
    rt.block_on(async {
        s_on.shutdown().await;
        s_off.shutdown().await;
    });
}
