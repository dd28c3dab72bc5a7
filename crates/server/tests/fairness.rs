//! Fair admission (issue #24): one request of many long samples must not starve a short one.
//! Counted in engine steps, never in time: in the engine directly (a 4-token request beside a
//! full batch of one group's samples completes within a few steps, and the preempted samples
//! come out exactly as they would alone), and through the server (the short request's
//! sequence completes within 64 engine steps of its arrival while the long request's need
//! 1,000 each).

mod common;

use std::time::Duration;

use candle_core::{DType, Device};
use common::{metric, post, until};
use lockstep_engine::{Completion, Engine, Request, SamplingParams};
use lockstep_server::{start, ServerConfig};
use serde_json::json;

fn engine() -> Engine {
    let (model, _) = lockstep_server::state::load_model("default", 0, DType::F32, &Device::Cpu, false).unwrap();
    let mut e = Engine::new(model);
    e.max_running = 4;
    e
}

fn req(prompt: &[u32], seed: u64, max_tokens: usize) -> Request {
    Request { prompt: prompt.to_vec(), params: SamplingParams { seed, max_tokens, ..SamplingParams::default() } }
}

#[test]
fn a_short_request_beside_a_full_batch_finishes_within_a_few_steps() {
    let mut e = engine();
    let big: Vec<u64> = (0..12).map(|i| e.submit_in_group(req(&[1, 2, 3], i, 120), 0).unwrap()).collect();
    let mut done: Vec<Completion> = Vec::new();
    for _ in 0..5 {
        done.extend(e.step().unwrap());
    }
    assert_eq!(e.num_running(), 4, "the big request fills the batch");
    let small = e.submit_in_group(req(&[4, 5], 99, 4), 1).unwrap();
    let mut steps = 0;
    let small_done = loop {
        steps += 1;
        let d = e.step().unwrap();
        let (mine, rest): (Vec<_>, Vec<_>) = d.into_iter().partition(|c| c.id == small);
        done.extend(rest);
        if let Some(c) = mine.into_iter().next() {
            break c;
        }
        assert!(steps < 1000, "the small request starved");
    };
    // admitted at once (one big sample preempted), prefilled, 4 tokens, its last route row
    assert!(steps <= 8, "the small request took {steps} steps");
    assert_eq!(small_done.tokens.len(), 4);
    assert!(e.num_preemptions() >= 1);
    while !e.is_idle() {
        done.extend(e.step().unwrap());
    }
    // nothing lost, and the preempted samples are what they would be alone
    let mut alone = engine();
    let reference = alone.generate((0..12).map(|i| req(&[1, 2, 3], i, 120)).collect()).unwrap();
    for (id, r) in big.iter().zip(&reference) {
        let c = done.iter().find(|c| c.id == *id).unwrap_or_else(|| panic!("sample {id} lost"));
        assert_eq!(c.tokens, r.tokens, "sample {id}");
        assert_eq!(c.logprobs, r.logprobs, "sample {id}");
        assert_eq!(c.routes.as_ref().map(|t| t.ids().to_vec()), r.routes.as_ref().map(|t| t.ids().to_vec()), "sample {id}");
    }
}

#[test]
fn ungrouped_requests_keep_first_come_first_served() {
    // each plain submission is a group of one: FIFO, no preemption for fairness
    let mut e = engine();
    let ids: Vec<u64> = (0..6).map(|i| e.submit(req(&[1, 2, 3], i, 8)).unwrap()).collect();
    let mut order = Vec::new();
    while !e.is_idle() {
        order.extend(e.step().unwrap().into_iter().map(|c| c.id));
    }
    assert_eq!(e.num_preemptions(), 0);
    assert_eq!(order.len(), ids.len());
    assert!(order[..4].iter().all(|id| ids[..4].contains(id)), "{order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_server_a_short_request_is_not_starved() {
    const LIMIT: Duration = Duration::from_secs(120);
    let srv = start(&ServerConfig { max_running: 4, ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let big = tokio::spawn(async move { post(addr, "/v1/completions", &json!({"prompt": "ab", "n": 16, "max_tokens": 1000, "ignore_eos": true})).await });
    until("the big request filling the batch", LIMIT, || async { metric(addr, "lockstep_running_sequences").await == 4.0 }).await;
    let r = post(addr, "/v1/completions", &json!({"prompt": "cd", "max_tokens": 4, "ignore_eos": true})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["choices"][0]["token_ids"].as_array().unwrap().len(), 4);
    // every big sample needs >= 1,000 steps: a completion within 64 is the small one's
    let within = metric(addr, "lockstep_sequence_engine_steps_bucket{le=\"64\"}").await;
    assert!(within >= 1.0, "the small request waited more than 64 engine steps");
    big.abort();
    until("the big request dropped", LIMIT, || async { metric(addr, "lockstep_running_sequences").await == 0.0 && metric(addr, "lockstep_waiting_sequences").await == 0.0 }).await;
    srv.shutdown().await;
}
