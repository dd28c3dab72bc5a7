//! The hooks a server needs: per-step sampled tokens, top-n log-probabilities, stop / abort
//! between steps, route capture off, route traces from a prefix on.

use candle_core::{DType, Device};
use lockstep_engine::{Engine, FinishReason, Request, SamplingParams};
use lockstep_model::{Kernels, MoeCausalLm};

fn model() -> MoeCausalLm {
    let mut m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    m
}

fn req(seed: u64, max_tokens: usize, logprobs: usize) -> Request {
    Request { prompt: vec![3, 1, 4, 1, 5], params: SamplingParams { seed, max_tokens, logprobs, ..SamplingParams::default() } }
}

#[test]
fn sampled_events_match_the_completion_and_top_n_is_sorted() {
    let mut e = Engine::new(model());
    let id = e.submit(req(7, 6, 3)).unwrap();
    let mut seen = Vec::new();
    let mut done = Vec::new();
    while !e.is_idle() {
        done.extend(e.step().unwrap());
        seen.extend(e.sampled().iter().filter(|s| s.id == id).cloned());
    }
    let c = &done[0];
    assert_eq!(seen.iter().map(|s| s.token).collect::<Vec<_>>(), c.tokens);
    assert_eq!(seen.iter().map(|s| s.logprob.to_bits()).collect::<Vec<_>>(), c.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    assert_eq!(seen.last().unwrap().finish, Some(FinishReason::Length));
    assert_eq!(c.top_logprobs.len(), c.tokens.len());
    for (top, (&tok, &lp)) in c.top_logprobs.iter().zip(c.tokens.iter().zip(&c.logprobs)) {
        assert_eq!(top.len(), 3);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(top.iter().any(|&(t, _)| t == tok) || top[2].1 >= lp);
        if let Some(&(_, l)) = top.iter().find(|&&(t, _)| t == tok) {
            assert_eq!(l.to_bits(), lp.to_bits());
        }
    }
    // no top-n asked: none kept
    let plain = Engine::new(model()).generate(vec![req(7, 6, 0)]).unwrap();
    assert!(plain[0].top_logprobs.is_empty());
    assert_eq!(plain[0].tokens, c.tokens);
}

#[test]
fn stop_and_abort_between_steps() {
    let mut e = Engine::new(model());
    let a = e.submit(req(1, 50, 0)).unwrap();
    let b = e.submit(req(2, 50, 0)).unwrap();
    assert!(!e.stop(a), "not running yet");
    e.step().unwrap();
    e.step().unwrap();
    assert!(e.stop(a));
    assert!(e.abort(b));
    assert!(!e.abort(b));
    let mut done = Vec::new();
    while !e.is_idle() {
        done.extend(e.step().unwrap());
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, a);
    assert_eq!(done[0].tokens.len(), 2);
    assert_eq!(done[0].finish, FinishReason::Stop);
    let r = done[0].routes.as_ref().unwrap();
    assert_eq!(r.num_tokens(), 5 + 2, "the stopped sequence's last row is there");
    assert_eq!(r.num_missing(), 0);
}

#[test]
fn capture_off_same_tokens_no_routes() {
    let reqs: Vec<Request> = (0..4).map(|i| req(i, 5 + i as usize, 0)).collect();
    let on = Engine::new(model()).generate(reqs.clone()).unwrap();
    let mut e = Engine::new(model());
    e.set_capture_routes(false).unwrap();
    assert!(!e.captures_routes());
    let off = e.generate(reqs).unwrap();
    for (a, b) in on.iter().zip(&off) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert!(b.routes.is_none());
        assert!(a.routes.as_ref().is_some_and(|r| r.num_layers() > 0));
    }
}

#[test]
fn route_trace_from_a_prefix() {
    let c = Engine::new(model()).generate(vec![req(3, 4, 0)]).unwrap().remove(0);
    let full = c.routes.clone().unwrap();
    assert_eq!(full.meta().prompt_len, 5);
    assert!(full.probs().is_some());
    let tail = full.tail(3).unwrap().without_probs();
    assert_eq!(full.num_tokens(), 9);
    assert_eq!(tail.num_tokens(), 6);
    assert_eq!(tail.meta().prompt_len, 2);
    assert!(tail.probs().is_none());
    for t in 0..6 {
        for l in 0..full.num_layers() {
            assert_eq!(tail.row(t, l), full.row(t + 3, l));
        }
    }
    assert_eq!(full.tail(100).unwrap().num_tokens(), 0);
    // the tail keeps the probabilities when asked to
    let tp = full.tail(3).unwrap();
    for t in 0..6 {
        assert_eq!(tp.row_probs(t, 0), full.row_probs(t + 3, 0));
    }
}
