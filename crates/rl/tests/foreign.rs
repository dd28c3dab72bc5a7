//! The RL loop against vLLM and SGLang servers (`rollout.servers = [{url, kind}]`). No vLLM or
//! SGLang can run here: a stand-in HTTP server answers as the upstream protocol files define
//! — vLLM `POST /v1/completions` (`vllm/entrypoints/openai/completion/protocol.py`,
//! `CompletionResponse` / `CompletionResponseChoice`: `prompt_token_ids`, `token_ids`,
//! `logprobs.token_logprobs`, `routed_experts` base64 `.npy` of shape `(num_tokens - 1,
//! num_hidden_layers, top_k)`), its dev endpoints `POST /collective_rpc` and
//! `/reset_prefix_cache` (`vllm/entrypoints/serve/dev/rpc/api_router.py`); SGLang `POST
//! /generate` (`python/sglang/srt/managers/io_struct.py`: `output_ids`,
//! `meta_info.output_token_logprobs` as `[logprob, token_id, text]`, `meta_info.routed_experts`
//! base64 int32 over `[start_len, seqlen - 1)`) and `POST /update_weights_from_disk`. Its
//! completions come from the real lockstep engine on the embedded default model, encoded by
//! the trace crate's exporters; it reloads the weights it is told to, so the run stays on policy
//! and the replayed routes are exactly the served ones.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use lockstep_engine::{Engine, FinishReason, Request, SamplingParams};
use lockstep_model::{Kernels, MoeCausalLm};
use lockstep_rl::config::{RunConfig, ServerKind, ServerSpec};
use lockstep_rl::foreign::{layout_of, ForeignEngine};
use lockstep_rl::{run, RunOptions};
use lockstep_trace::interop::{sglang, vllm, ExportMeta, ModelLayout};
use lockstep_trace::RouteTrace;
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// completions answer 500
    Status500,
    /// completions answer without the routed experts / output ids
    MissingField,
}

struct State {
    kind: ServerKind,
    engine: Engine,
    layout: ModelLayout,
    /// where a vLLM server was started (`--model`): what `reload_weights` re-reads
    model_path: PathBuf,
    /// (path, body) of every weight-reload call
    reloads: Vec<(String, Value)>,
    /// the engine's route trace of every completion served
    served: Vec<RouteTrace>,
    fault: Fault,
}

fn engine_of(m: MoeCausalLm) -> Engine {
    let mut m = m;
    m.set_kernels(Kernels::Invariant);
    let mut e = Engine::new(m);
    e.set_capture_routes(true).unwrap();
    e.cache.max_model_len = 4096;
    e
}

fn stand_in(kind: ServerKind, model_path: PathBuf, fault: Fault) -> (String, Arc<Mutex<State>>) {
    let model = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    let layout = layout_of(&model.cfg).unwrap();
    let st = Arc::new(Mutex::new(State {
        kind,
        engine: engine_of(model),
        layout,
        model_path,
        reloads: Vec::new(),
        served: Vec::new(),
        fault,
    }));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let s2 = st.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let st = s2.clone();
            std::thread::spawn(move || serve_one(conn, &st));
        }
    });
    (url, st)
}

fn serve_one(mut s: std::net::TcpStream, st: &Mutex<State>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, len) = loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let body: Value = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    let (status, answer) = route(&path, &body, st);
    let text = answer.to_string();
    let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
}

fn params_of(p: &Value, max_key: &str, seed_key: &str) -> SamplingParams {
    SamplingParams {
        temperature: p["temperature"].as_f64().unwrap() as f32,
        top_p: p["top_p"].as_f64().unwrap_or(1.0) as f32,
        top_k: p["top_k"].as_u64().unwrap_or(0) as usize,
        seed: p[seed_key].as_u64().unwrap(),
        max_tokens: p[max_key].as_u64().unwrap() as usize,
        stop_token_ids: serde_json::from_value(p["stop_token_ids"].clone()).unwrap_or_default(),
        ..SamplingParams::default()
    }
}

fn route(path: &str, body: &Value, st: &Mutex<State>) -> (&'static str, Value) {
    let mut st = st.lock().unwrap();
    let kind = st.kind;
    match (kind, path) {
        (_, "/health") => ("200 OK", Value::Null),
        (ServerKind::Vllm, "/collective_rpc") => {
            // vllm/entrypoints/serve/dev/rpc/api_router.py: {"method", "args", "kwargs", "timeout"} -> {"results": [...]}
            assert_eq!(body["method"], "reload_weights");
            let m = MoeCausalLm::load(&st.model_path, DType::F32, &Device::Cpu).unwrap();
            st.engine = engine_of(m);
            st.reloads.push((path.into(), body.clone()));
            ("200 OK", json!({"results": [null]}))
        }
        (ServerKind::Vllm, "/reset_prefix_cache") => ("200 OK", Value::Null),
        (ServerKind::Sglang, "/update_weights_from_disk") => {
            // io_struct.py UpdateWeightFromDiskReqInput {model_path, load_format, ...} -> {success, message, num_paused_requests}
            let dir = PathBuf::from(body["model_path"].as_str().unwrap());
            let m = MoeCausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
            st.engine = engine_of(m);
            st.reloads.push((path.into(), body.clone()));
            (
                "200 OK",
                json!({"success": true, "message": "Succeeded to update model weights.", "num_paused_requests": 0}),
            )
        }
        (_, "/v1/completions" | "/generate") if st.fault == Fault::Status500 => (
            "500 Internal Server Error",
            json!({"object": "error", "message": "CUDA out of memory", "code": 500}),
        ),
        (ServerKind::Vllm, "/v1/completions") => {
            let prompt: Vec<u32> = serde_json::from_value(body["prompt"].clone()).unwrap();
            assert_eq!(body["return_token_ids"], true);
            let c = st
                .engine
                .generate(vec![Request {
                    prompt,
                    params: params_of(body, "max_tokens", "seed"),
                }])
                .unwrap()
                .remove(0);
            let trace = c.routes.clone().unwrap();
            let (re, _) = vllm::to_b64(&trace, None, &ExportMeta::of(&st.layout)).unwrap();
            st.served.push(trace);
            let mut choice = json!({
                "index": 0,
                "text": "",
                "logprobs": {"text_offset": vec![0; c.tokens.len()], "token_logprobs": c.logprobs, "tokens": c.tokens.iter().map(|t| format!("token_id:{t}")).collect::<Vec<_>>(), "top_logprobs": Value::Null},
                "finish_reason": if c.finish == FinishReason::Stop { "stop" } else { "length" },
                "stop_reason": Value::Null,
                "prompt_token_ids": c.prompt,
                "token_ids": c.tokens,
                "routed_experts": re,
            });
            if st.fault == Fault::MissingField {
                choice.as_object_mut().unwrap().remove("routed_experts");
            }
            let usage = json!({"prompt_tokens": c.prompt.len(), "completion_tokens": c.tokens.len(), "total_tokens": c.prompt.len() + c.tokens.len()});
            (
                "200 OK",
                json!({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "stand-in", "choices": [choice], "usage": usage}),
            )
        }
        (ServerKind::Sglang, "/generate") => {
            let prompt: Vec<u32> = serde_json::from_value(body["input_ids"].clone()).unwrap();
            assert_eq!(body["return_routed_experts"], true);
            let c = st
                .engine
                .generate(vec![Request {
                    prompt,
                    params: params_of(&body["sampling_params"], "max_new_tokens", "sampling_seed"),
                }])
                .unwrap()
                .remove(0);
            let trace = c.routes.clone().unwrap();
            let (mut v, _) = sglang::to_json(&trace, &ExportMeta::of(&st.layout)).unwrap();
            st.served.push(trace);
            let mi = v["meta_info"].as_object_mut().unwrap();
            mi.insert("id".into(), json!("req-1"));
            mi.insert(
                "output_token_logprobs".into(),
                json!(c
                    .logprobs
                    .iter()
                    .zip(&c.tokens)
                    .map(|(l, t)| json!([l, t, Value::Null]))
                    .collect::<Vec<_>>()),
            );
            mi.insert(
                "finish_reason".into(),
                if c.finish == FinishReason::Stop {
                    json!({"type": "stop", "matched": c.tokens.last()})
                } else {
                    json!({"type": "length", "length": c.tokens.len()})
                },
            );
            v["text"] = json!("");
            v["output_ids"] = json!(c.tokens);
            if st.fault == Fault::MissingField {
                v.as_object_mut().unwrap().remove("output_ids");
            }
            ("200 OK", v)
        }
        _ => ("404 Not Found", json!({"detail": "Not Found"})),
    }
}

fn tiny() -> RunConfig {
    let mut c = RunConfig::default_config();
    c.steps = 2;
    c.warmup.steps = 10;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.trainer.mini_steps = 1;
    c.eval.every = 2;
    c.output.checkpoint_every = 0;
    c
}

fn rl_run_against(kind: ServerKind) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (url, st) = stand_in(kind, out.join("weights-sync"), Fault::None);
    let mut c = tiny();
    // the table form, as a user writes it
    let toml = format!(
        "[rollout]\nservers = [{{url = \"{url}\", kind = \"{}\"}}]\n",
        kind.name()
    );
    c.rollout.servers = RunConfig::from_toml(&toml).unwrap().rollout.servers;
    assert_eq!(
        c.rollout.server_specs().unwrap(),
        vec![ServerSpec {
            kind,
            url: url.clone()
        }]
    );
    let s = run(&c, &out, true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 2);
    for r in &rl {
        // the server reloaded the trainer's weights: its log-probs are the trainer's, and the
        // replayed routes are the ones it served
        assert_eq!(
            r.kl, 0.0,
            "step {}: served logprobs equal the trainer's",
            r.step
        );
        assert!(
            !r.layers.is_empty() && r.layers.values().all(|l| l.route_agreement == 1.0),
            "step {}: {:?}",
            r.step,
            r.layers
        );
    }
    let st = st.lock().unwrap();
    // a reload before every step's rollouts and evaluation (after the warm-up, 2 steps, the
    // final eval), each with a new checkpoint the run published
    assert_eq!(st.reloads.len(), 4, "{:?}", st.reloads);
    let canon = std::fs::canonicalize(&out).unwrap();
    for (i, (path, body)) in st.reloads.iter().enumerate() {
        match kind {
            ServerKind::Sglang => {
                assert_eq!(path, "/update_weights_from_disk");
                assert_eq!(
                    body["model_path"].as_str().unwrap(),
                    canon
                        .join(format!("weights-sync.{}", i + 1))
                        .display()
                        .to_string()
                );
            }
            _ => assert_eq!(path, "/collective_rpc"),
        }
    }
    assert_eq!(
        std::fs::read_link(out.join("weights-sync")).unwrap(),
        PathBuf::from("weights-sync.4")
    );
    // the one before is kept (a server may still read it), older ones removed
    assert!(out.join("weights-sync.3").is_dir() && !out.join("weights-sync.2").exists());
    assert!(st.served.len() >= 2 * 4 * 4);
}

#[test]
fn rl_run_with_vllm_server_replays_its_routes() {
    rl_run_against(ServerKind::Vllm);
}

#[test]
fn rl_run_with_sglang_server_replays_its_routes() {
    rl_run_against(ServerKind::Sglang);
}

/// The client's completions carry exactly the rows the server encoded: every token but the
/// last (a missing row, never invented), the MoE layers only, no router probabilities.
#[test]
fn decoded_routes_are_the_served_rows() {
    for kind in [ServerKind::Vllm, ServerKind::Sglang] {
        let (url, st) = stand_in(kind, PathBuf::from("/nonexistent"), Fault::None);
        let layout = st.lock().unwrap().layout.clone();
        let f = ForeignEngine::new(vec![ServerSpec { kind, url }], layout);
        let reqs: Vec<Request> = (0..3)
            .map(|i| Request {
                prompt: vec![1, 2, 3 + i],
                params: SamplingParams {
                    temperature: 1.0,
                    seed: i as u64,
                    max_tokens: 4,
                    ..SamplingParams::default()
                },
            })
            .collect();
        let got = f.generate(&reqs).unwrap();
        let st = st.lock().unwrap();
        assert_eq!(st.served.len(), 3);
        for c in &got {
            let r = c.routes.as_ref().unwrap();
            let n = c.prompt.len() + c.tokens.len();
            assert_eq!(c.logprobs.len(), c.tokens.len());
            assert_eq!(r.num_tokens(), n);
            assert!(r.is_missing(n - 1), "the last token has no row");
            assert!(r.probs().is_none());
            // which served trace: the one whose rows agree (requests run concurrently)
            let served = st
                .served
                .iter()
                .find(|t| {
                    t.num_tokens() == n
                        && (0..n - 1)
                            .all(|t2| (0..t.num_layers()).all(|l| t.row(t2, l) == r.row(t2, l)))
                })
                .expect("a served trace with these rows");
            assert_eq!(served.layers(), r.layers());
            for t in 0..n - 1 {
                assert!(!r.is_missing(t));
            }
        }
    }
}

#[test]
fn bad_answers_are_named_with_the_url() {
    for kind in [ServerKind::Vllm, ServerKind::Sglang] {
        let req = vec![Request {
            prompt: vec![1, 2, 3],
            params: SamplingParams {
                temperature: 1.0,
                max_tokens: 2,
                ..SamplingParams::default()
            },
        }];
        let (url, st) = stand_in(kind, PathBuf::from("/nonexistent"), Fault::Status500);
        let layout = st.lock().unwrap().layout.clone();
        let e = ForeignEngine::new(
            vec![ServerSpec {
                kind,
                url: url.clone(),
            }],
            layout.clone(),
        )
        .generate(&req)
        .unwrap_err()
        .to_string();
        eprintln!("{e}");
        assert!(
            e.contains(&url) && e.contains("HTTP 500") && e.contains("out of memory"),
            "{e}"
        );
        let (url, _) = stand_in(kind, PathBuf::from("/nonexistent"), Fault::MissingField);
        let e = ForeignEngine::new(
            vec![ServerSpec {
                kind,
                url: url.clone(),
            }],
            layout,
        )
        .generate(&req)
        .unwrap_err()
        .to_string();
        eprintln!("{e}");
        let field = if kind == ServerKind::Vllm {
            "routed_experts"
        } else {
            "output_ids"
        };
        assert!(
            e.contains(&url) && e.contains(field) && e.contains("missing"),
            "{e}"
        );
    }
    // a server that is down fails the run up front, naming the URL
    let dir = tempfile::tempdir().unwrap();
    let mut c = tiny();
    c.rollout.servers = vec!["sglang+http://127.0.0.1:1".into()];
    let e = run(&c, dir.path(), true, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("http://127.0.0.1:1/health") && e.contains("unreachable"),
        "{e}"
    );
}

#[test]
fn server_tables_parse_and_bad_ones_are_named() {
    let parse = |s: &str| RunConfig::from_toml(&format!("[rollout]\nservers = {s}\n"));
    let c =
        parse(r#"["http://a:1", {url = "http://b:2"}, {url = "http://c:3", kind = "lockstep"}]"#)
            .unwrap();
    assert_eq!(
        c.rollout.servers,
        vec!["http://a:1", "http://b:2", "http://c:3"]
    );
    let c = parse(r#"[{url = "http://v:1", kind = "vllm"}, "sglang+http://s:2"]"#).unwrap();
    assert_eq!(
        c.rollout
            .server_specs()
            .unwrap()
            .iter()
            .map(|s| s.kind)
            .collect::<Vec<_>>(),
        vec![ServerKind::Vllm, ServerKind::Sglang]
    );
    // the effective config parses back
    assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
    let e = parse(r#"["http://a:1", {url = "http://b:2", kind = "tgi"}]"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rollout.servers[1].kind") && e.contains("tgi"),
        "{e}"
    );
    let e = parse(r#"[{url = "http://b:2", knd = "vllm"}]"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rollout.servers[0]") && e.contains("knd"), "{e}");
    let e = parse(r#"[{kind = "vllm"}]"#).unwrap_err().to_string();
    assert!(e.contains("rollout.servers[0].url"), "{e}");
    let e = parse(r#"["tgi+http://a:1"]"#).unwrap_err().to_string();
    assert!(e.contains("rollout.servers[0].kind"), "{e}");
    let e = parse(r#"["http://a:1", "vllm+http://b:2"]"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rollout.servers[1].kind") && e.contains("mixed"),
        "{e}"
    );
}
