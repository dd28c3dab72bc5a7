//! The server on loopback (port 0), the embedded default: concurrent requests, every response
//! re-scored with the trainer's forward (log-probabilities and routes equal bit for bit, so no
//! response carries another's routes), streaming == non-streaming for a fixed seed, bad
//! requests answered 4xx while the server keeps serving, weight reloads, client disconnects.

mod common;

use std::time::Duration;

use candle_core::{DType, Device};
use common::{completion, f32s, get, ids, post, trace};
use lockstep_engine::consistency::rescore;
use lockstep_model::{Kernels, MoeCausalLm};
use lockstep_server::{start, ServerConfig};
use serde_json::{json, Value};

fn invariant(seed: u64) -> MoeCausalLm {
    let mut m = MoeCausalLm::embedded_default(seed, DType::F32, &Device::Cpu).unwrap();
    m.set_kernels(Kernels::Invariant);
    m
}

/// Every choice of a completions response: rows = prompt + completion tokens, nested lists
/// equal the trace, then re-scored together: bitwise equal.
fn check_lockstep(model: &MoeCausalLm, choices: &[Value]) {
    let mut comps = Vec::new();
    for ch in choices {
        let t = trace(ch);
        let (p, c) = (ids(&ch["prompt_token_ids"]), ids(&ch["token_ids"]));
        assert!(!c.is_empty());
        assert_eq!(t.num_tokens(), p.len() + c.len(), "a route row for every token");
        assert_eq!(t.num_missing(), 0);
        assert_eq!(t.meta().prompt_len as usize, p.len());
        assert_eq!(t.layers(), &[0, 1, 3], "MoE layers of the default (layer 2 is dense)");
        match ch.get("routed_experts") {
            // lockstep's form: every token, MoE layers
            Some(Value::Array(nested)) => {
                assert_eq!(nested.len(), t.num_tokens());
                for (tok, row) in nested.iter().enumerate() {
                    for (li, ids_) in row.as_array().unwrap().iter().enumerate() {
                        assert_eq!(ids(ids_), t.row_u32(tok, li).unwrap());
                    }
                }
            }
            // current vLLM's: N - 1 rows, every decoder layer, the dense one zero
            Some(Value::String(s)) => common::check_vllm_routes(s, &t, 0),
            other => panic!("routed_experts: {other:?}"),
        }
        let lp = f32s(&ch["logprobs"]["token_logprobs"]);
        assert_eq!(lp.len(), c.len());
        comps.push(completion(ch, &lp));
    }
    let rep = rescore(model, &comps).unwrap();
    assert_eq!(rep.max_abs_logprob_diff, 0.0, "{rep:?}");
    assert_eq!(rep.route_agreement, 1.0, "{rep:?}");
    assert_eq!(rep.prob_rows_differing, 0, "{rep:?}");
}

fn body(i: usize, stream: bool) -> Value {
    let prompt: Value =
        if i % 3 == 0 { json!((0..(1 + i * 3) as u32).map(|j| (j * 7 + i as u32) % 256).collect::<Vec<_>>()) } else { json!(format!("{i}+{}= and some text", i * 7).repeat(1 + i % 4)) };
    let form = if i % 2 == 0 { "lockstep" } else { "vllm" };
    json!({"model": "default", "prompt": prompt, "max_tokens": 3 + i % 9, "temperature": 1.0, "seed": 1000 + i,
           "logprobs": 2, "routed_experts_format": form, "return_router_probs": true, "stream": stream})
}

/// The final chunk of each choice carries the fields of a whole response; text and
/// log-probabilities are gathered from all chunks.
fn assemble(events: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for e in events {
        for ch in e["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            while out.len() <= i {
                out.push(json!({"text": "", "logprobs": {"token_logprobs": [], "tokens": []}}));
            }
            let o = &mut out[i];
            let piece = ch.get("text").or_else(|| ch["delta"].get("content")).and_then(|t| t.as_str()).unwrap_or("");
            o["text"] = json!(format!("{}{piece}", o["text"].as_str().unwrap()));
            if let Some(lp) = ch["logprobs"].get("token_logprobs") {
                o["logprobs"]["token_logprobs"].as_array_mut().unwrap().extend(lp.as_array().unwrap().iter().cloned());
            }
            if let Some(c) = ch["logprobs"].get("content") {
                o["logprobs"]["token_logprobs"].as_array_mut().unwrap().extend(c.as_array().unwrap().iter().map(|x| x["logprob"].clone()));
            }
            if !ch["finish_reason"].is_null() {
                for (k, v) in ch.as_object().unwrap() {
                    if !["text", "logprobs", "delta", "index"].contains(&k.as_str()) {
                        o[k] = v.clone();
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_in_lockstep_with_the_trainer() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let n = 16;
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(async move { post(addr, "/v1/completions", &body(i, i % 4 == 1)).await })).collect();
    let mut choices = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let ch = if i % 4 == 1 { assemble(&r.events()).remove(0) } else { r.json()["choices"][0].clone() };
        let b = body(i, false);
        assert_eq!(ids(&ch["token_ids"]).len(), b["max_tokens"].as_u64().unwrap() as usize, "no stop: max_tokens");
        assert_eq!(ch["finish_reason"], "length");
        if i % 3 == 0 {
            assert_eq!(ch["prompt_token_ids"], b["prompt"]);
        } else {
            assert_eq!(ids(&ch["prompt_token_ids"]), b["prompt"].as_str().unwrap().bytes().map(u32::from).collect::<Vec<_>>());
        }
        assert_eq!(ch["policy_version"], 0);
        choices.push(ch);
    }
    check_lockstep(&invariant(0), &choices);
    let metrics = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
    let value = |name: &str| -> u64 { metrics.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap())).unwrap() };
    let (steps, generated) = (value("lockstep_engine_steps_total "), value("lockstep_generation_tokens_total "));
    assert!(steps < generated, "requests were batched: {steps} steps for {generated} tokens");

    // several prompts x n in one request: each choice equals the single request with seed + j
    let multi = post(addr, "/v1/completions", &json!({"prompt": ["ab", "xyz"], "n": 2, "seed": 5, "max_tokens": 4, "logprobs": 0})).await.json();
    assert_eq!(multi["choices"].as_array().unwrap().len(), 4);
    assert_eq!(multi["usage"]["prompt_tokens"], 5);
    assert_eq!(multi["usage"]["completion_tokens"], 16);
    for (c, (p, j)) in [("ab", 0), ("ab", 1), ("xyz", 0), ("xyz", 1)].iter().enumerate() {
        let one = post(addr, "/v1/completions", &json!({"prompt": p, "seed": 5 + j, "max_tokens": 4})).await.json();
        assert_eq!(one["choices"][0]["token_ids"], multi["choices"][c]["token_ids"]);
        assert_eq!(one["choices"][0]["routes"], multi["choices"][c]["routes"]);
    }

    // routes_prompt_start: the rows from that token on, identical to the full trace's
    let full = post(addr, "/v1/completions", &json!({"prompt": "0123456789", "seed": 3, "max_tokens": 5})).await.json();
    let part = post(addr, "/v1/completions", &json!({"prompt": "0123456789", "seed": 3, "max_tokens": 5, "routes_prompt_start": 7, "routed_experts_format": "lockstep"})).await.json();
    let (ft, pt) = (trace(&full["choices"][0]), trace(&part["choices"][0]));
    assert_eq!(pt.num_tokens(), 15 - 7);
    assert_eq!(pt.meta().prompt_len, 3);
    assert_eq!(part["choices"][0]["routes_start"], 7);
    assert_eq!(part["choices"][0]["routed_experts"].as_array().unwrap().len(), 8);
    for t in 0..8 {
        for l in 0..3 {
            assert_eq!(pt.row(t, l), ft.row(t + 7, l));
        }
    }
    assert!(ft.probs().is_none() && pt.probs().is_none(), "probabilities only with return_router_probs");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_whole_responses_agree() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let cases = [
        ("/v1/completions", json!({"prompt": "12+34=", "max_tokens": 24, "seed": 11, "logprobs": 3, "stop": ["7", "\n\n"]})),
        ("/v1/completions", json!({"prompt": [1, 2, 3], "max_tokens": 12, "seed": 12, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "n": 3})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": [{"type": "text", "text": "2+2="}]}], "max_tokens": 16, "seed": 13, "logprobs": true, "top_logprobs": 2, "stop": "a"}),
        ),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10, "seed": 14, "n": 2, "stop_token_ids": [10, 32]})),
    ];
    let mut handles = Vec::new();
    for (path, b) in cases.iter().cloned() {
        for stream in [false, true] {
            let mut b = b.clone();
            b["stream"] = json!(stream);
            b["stream_options"] = json!({"include_usage": true});
            handles.push(tokio::spawn(async move { post(addr, path, &b).await }));
        }
    }
    let mut replies = Vec::new();
    for h in handles {
        replies.push(h.await.unwrap());
    }
    for (k, pair) in replies.chunks(2).enumerate() {
        let chat = cases[k].0.contains("chat");
        assert_eq!(pair[0].status, 200);
        assert_eq!(pair[1].status, 200);
        let whole = pair[0].json();
        let events = pair[1].events();
        let usage = events.last().unwrap();
        assert_eq!(usage["usage"], whole["usage"], "include_usage: the last chunk");
        if chat {
            assert_eq!(events[0]["object"], "chat.completion.chunk");
            assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        }
        let streamed = assemble(&events);
        let choices = whole["choices"].as_array().unwrap();
        assert_eq!(streamed.len(), choices.len());
        for (s, w) in streamed.iter().zip(choices) {
            let text = if chat { &w["message"]["content"] } else { &w["text"] };
            assert_eq!(&s["text"], text, "case {k}");
            for f in ["token_ids", "prompt_token_ids", "routes", "finish_reason", "policy_version"] {
                assert_eq!(s[f], w[f], "case {k}: {f}");
            }
            if !w["logprobs"].is_null() {
                let wl = if chat { json!(w["logprobs"]["content"].as_array().unwrap().iter().map(|x| x["logprob"].clone()).collect::<Vec<_>>()) } else { w["logprobs"]["token_logprobs"].clone() };
                assert_eq!(s["logprobs"]["token_logprobs"], wl, "case {k}");
            }
        }
        // stop strings: the text ends before one; a stop string or token ends with "stop"
        for w in choices {
            let toks = ids(&w["token_ids"]);
            let text = if chat { w["message"]["content"].as_str().unwrap() } else { w["text"].as_str().unwrap() };
            if let Some(stops) = cases[k].1.get("stop") {
                let stops: Vec<String> = if stops.is_string() { vec![stops.as_str().unwrap().into()] } else { stops.as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect() };
                assert!(stops.iter().all(|s| !text.contains(s.as_str())));
                if w["finish_reason"] == "stop" {
                    let all = String::from_utf8_lossy(&toks.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned();
                    assert!(stops.iter().any(|s| all.contains(s.as_str())));
                }
            }
            if let Some(st) = cases[k].1.get("stop_token_ids") {
                let st = ids(st);
                assert!(toks[..toks.len() - 1].iter().all(|t| !st.contains(t)));
                assert_eq!(w["finish_reason"] == "stop", st.contains(toks.last().unwrap()));
            }
        }
    }
    // top-n lists are sorted, and the chat ones name token ids
    let w = replies[4].json();
    for t in w["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert!(t["token_id"].is_u64());
    }
    srv.shutdown().await;
}

fn check_error(r: &common::Reply, status: u16, param: Option<&str>, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
    let e = &r.json()["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "{what}: error.{k} present: {e}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{what}: {e}");
        assert!(e["message"].as_str().unwrap().contains(p), "{what}: the message names the field: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let raw = [
        ("/v1/completions", "{\"prompt\": ", None, "malformed JSON"),
        ("/v1/completions", "[1, 2]", None, "not an object"),
        ("/v1/completions", "", None, "empty body"),
        ("/v1/completions", "{\"prompt\": \"hi\", \"max_tokens\": \"ten\"}", Some("max_tokens"), "wrong type"),
        ("/v1/completions", "{\"prompt\": \"hi\", \"temperature\": \"hot\"}", Some("temperature"), "wrong type"),
        ("/v1/completions", "{\"prompt\": {\"a\": 1}}", Some("prompt"), "wrong prompt type"),
        ("/v1/completions", "{\"prompt\": [1, -2]}", Some("prompt"), "negative token id"),
        ("/v1/chat/completions", "{\"messages\": \"hi\"}", Some("messages"), "messages not a list"),
    ];
    for (path, b, param, what) in raw {
        check_error(&common::call(addr, "POST", path, b).await, 400, param, what);
    }
    let cases = [
        ("/v1/completions", json!({"model": "gpt-4", "prompt": "hi"}), 404, "model"),
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 5000}), 400, "max_tokens"),
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 0}), 400, "max_tokens"),
        ("/v1/completions", json!({"prompt": "x".repeat(1024)}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": ""}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": []}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": [300]}), 400, "prompt"),
        ("/v1/completions", json!({"max_tokens": 3}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": "hi", "temperature": -1}), 400, "temperature"),
        ("/v1/completions", json!({"prompt": "hi", "top_p": 0}), 400, "top_p"),
        ("/v1/completions", json!({"prompt": "hi", "top_k": -5}), 400, "top_k"),
        ("/v1/completions", json!({"prompt": "hi", "n": 0}), 400, "n"),
        ("/v1/completions", json!({"prompt": "hi", "logprobs": 100}), 400, "logprobs"),
        ("/v1/completions", json!({"prompt": "hi", "logprobs": true}), 400, "logprobs"),
        ("/v1/completions", json!({"prompt": "hi", "stop_token_ids": [999]}), 400, "stop_token_ids"),
        ("/v1/completions", json!({"prompt": "hi", "stop": [""]}), 400, "stop"),
        ("/v1/completions", json!({"prompt": "hi", "routes_prompt_start": 3}), 400, "routes_prompt_start"),
        ("/v1/completions", json!({"prompt": "hi", "routed_experts_prompt_start": 3}), 400, "routed_experts_prompt_start"),
        ("/v1/completions", json!({"prompt": "hi", "routed_experts_start_len": 3}), 400, "routed_experts_start_len"),
        ("/v1/completions", json!({"prompt": "hi", "routed_experts_format": "npz"}), 400, "routed_experts_format"),
        ("/v1/completions", json!({"prompt": "hi", "response_format": {"type": "json_object"}}), 400, "response_format"),
        ("/v1/completions", json!({"prompt": "hi", "min_p": 0.1}), 400, "min_p"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {}}}), 400, "response_format"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}), 400, "tool_choice"),
        ("/inference/v1/generate", json!({"sampling_params": {"max_tokens": 2}}), 400, "token_ids"),
        ("/inference/v1/generate", json!({"token_ids": [1, 2], "sampling_params": {"max_tokens": "x"}}), 400, "sampling_params.max_tokens"),
        ("/inference/v1/generate", json!({"token_ids": [1, 2], "stream": true}), 400, "stream"),
        ("/generate", json!({"sampling_params": {"max_new_tokens": 2}}), 400, "text"),
        ("/generate", json!({"input_ids": [1, 2], "sampling_params": {"regex": "a+"}}), 400, "sampling_params.regex"),
        ("/generate", json!({"input_ids": [1, 2], "return_routed_experts": true, "routed_experts_start_len": 5}), 400, "routed_experts_start_len"),
        ("/v1/completions", json!({"prompt": "hi", "echo": true}), 400, "echo"),
        ("/v1/completions", json!({"prompt": "hi", "frequency_penalty": 0.5}), 400, "frequency_penalty"),
        ("/v1/completions", json!({"prompt": "hi", "messages": []}), 400, "messages"),
        ("/v1/completions", json!({"prompt": "hi", "stream": true, "max_tokens": 9999}), 400, "max_tokens"),
        ("/v1/chat/completions", json!({"messages": []}), 400, "messages"),
        ("/v1/chat/completions", json!({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}), 400, "prompt"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400, "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}), 400, "logprobs"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}), 400, "top_logprobs"),
        ("/v1/load_weights", json!({"path": "/nonexistent/checkpoint"}), 400, "path"),
        ("/v1/load_weights", json!({"version": 3}), 400, "path"),
    ];
    for (path, b, status, param) in cases {
        check_error(&post(addr, path, &b).await, status, Some(param), &b.to_string());
    }
    check_error(&get(addr, "/v1/nothing").await, 404, None, "unknown route");
    check_error(&get(addr, "/v1/completions").await, 405, None, "wrong method");
    // still serving
    let ok = post(addr, "/v1/completions", &json!({"prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ids(&ok.json()["choices"][0]["token_ids"]).len(), 2);
    assert_eq!(get(addr, "/health").await.status, 200);
    let models = get(addr, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], "default");
    assert_eq!(models["data"][0]["max_model_len"], 1024);
    let metrics = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
    for line in [
        "lockstep_requests_total{endpoint=\"/v1/completions\",status=\"400\"}",
        "lockstep_requests_total{endpoint=\"/v1/completions\",status=\"404\"}",
        "lockstep_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "lockstep_generation_tokens_total 2",
        "lockstep_request_duration_seconds_count 1",
        "lockstep_route_capture_bytes_total",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_weights_drains_swaps_and_bumps_the_policy_version() {
    let dir = std::env::temp_dir().join(format!("lockstep-server-load-{}", std::process::id()));
    let new_model = invariant(1);
    new_model.save(&dir).unwrap();
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let long = tokio::spawn(async move { post(addr, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 1000, "seed": 1, "logprobs": 0, "return_router_probs": true})).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!long.is_finished(), "the load comes while a request is in flight");
    let path = dir.display().to_string();
    let load = post(addr, "/v1/load_weights", &json!({"path": path, "version": 7})).await;
    assert_eq!(load.status, 200, "{}", String::from_utf8_lossy(&load.body));
    assert_eq!(load.json()["policy_version"], 7);
    let old = long.await.unwrap().json();
    assert_eq!(old["choices"][0]["policy_version"], 0, "the in-flight request finished on the old weights");
    check_lockstep(&invariant(0), &[old["choices"][0].clone()]);
    let new = post(addr, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 8, "seed": 1, "logprobs": 1, "return_router_probs": true})).await.json();
    let ch = &new["choices"][0];
    assert_eq!(ch["policy_version"], 7);
    assert_eq!(trace(ch).meta().policy_version, 7);
    check_lockstep(&new_model, std::slice::from_ref(ch));
    assert_eq!(get(addr, "/health").await.json()["policy_version"], 7);
    // without a version: current + 1
    assert_eq!(post(addr, "/v1/load_weights", &json!({"path": path})).await.json()["policy_version"], 8);
    // a checkpoint of another shape is refused
    let wide = dir.with_extension("wide");
    let mut cfg: Value = serde_json::from_str(lockstep_model::init::DEFAULT_CONFIG_JSON).unwrap();
    cfg["num_experts"] = json!(4);
    let other = MoeCausalLm::random(&lockstep_model::ModelConfig::from_json_str(&cfg.to_string(), "x").unwrap(), 0, DType::F32, &Device::Cpu).unwrap();
    other.save(&wide).unwrap();
    check_error(&post(addr, "/v1/load_weights", &json!({"path": wide.display().to_string()})).await, 400, Some("path"), "other shape");
    assert_eq!(post(addr, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 2})).await.json()["choices"][0]["policy_version"], 8);
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&wide);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_sequence() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let req = tokio::spawn(async move { post(addr, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 1000, "stream": true})).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    req.abort(); // drops the connection mid-stream
    let mut freed = false;
    for _ in 0..200 {
        let m = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
        if m.contains("lockstep_running_sequences 0") && m.contains("lockstep_waiting_sequences 0") {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the engine dropped the abandoned request");
    let gen: u64 = String::from_utf8(get(addr, "/metrics").await.body).unwrap().lines().find_map(|l| l.strip_prefix("lockstep_generation_tokens_total ").map(|v| v.parse().unwrap())).unwrap();
    assert!(gen < 1000, "stopped early: {gen} tokens");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_ends_the_request_at_the_token_that_completes_it() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let printable = |t: u32| (0x20..0x7f).contains(&t);
    let mut checked = 0;
    for seed in 0..60u64 {
        let base = json!({"prompt": "The sum is ", "max_tokens": 24, "seed": seed, "temperature": 1.0});
        let toks = ids(&post(addr, "/v1/completions", &base).await.json()["choices"][0]["token_ids"]);
        let text = |ts: &[u32]| String::from_utf8_lossy(&ts.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned();
        // a two-token stop string that first appears at tokens k-1..=k
        let Some(k) = (3..toks.len() - 1).find(|&k| printable(toks[k - 1]) && printable(toks[k]) && !text(&toks[..k]).contains(&text(&toks[k - 1..=k]))) else {
            continue;
        };
        let stop = text(&toks[k - 1..=k]);
        let mut b = base.clone();
        b["stop"] = json!([stop]);
        // alongside other requests (batched), whole and streamed
        let noise: Vec<_> = (0..4).map(|i| tokio::spawn(async move { post(addr, "/v1/completions", &json!({"prompt": "xx", "max_tokens": 30, "seed": i})).await })).collect();
        let whole = post(addr, "/v1/completions", &b).await.json();
        b["stream"] = json!(true);
        let streamed = assemble(&post(addr, "/v1/completions", &b).await.events());
        for n in noise {
            assert_eq!(n.await.unwrap().status, 200);
        }
        let ch = &whole["choices"][0];
        assert_eq!(ids(&ch["token_ids"]), toks[..=k].to_vec(), "seed {seed}: stop {stop:?}");
        assert_eq!(ch["finish_reason"], "stop");
        assert_eq!(ch["text"], text(&toks[..k - 1]));
        assert_eq!(trace(ch).num_tokens(), 11 + k + 1);
        assert_eq!(streamed[0]["text"], ch["text"]);
        assert_eq!(streamed[0]["token_ids"], ch["token_ids"]);
        assert_eq!(streamed[0]["routes"], ch["routes"]);
        checked += 1;
        if checked == 3 {
            break;
        }
    }
    assert_eq!(checked, 3, "found two-token stop strings to test");
    srv.shutdown().await;
}
