//! The server's JSON request bodies: arbitrary bytes parsed into every request type and checked
//! by the server's own validation (`GenRequest::parse` + `generate::plan`), then sent through
//! the real axum router (`/v1/completions`, `/v1/chat/completions`, `/inference/v1/generate`,
//! `/generate`, `/v1/load_weights`). Never panics; every answer that is not a 200 is an
//! OpenAI-style JSON error body.
//!
//! The engine thread runs with `max_waiting = 0`: a request that passes every check is refused
//! with a 503 at submission instead of generating, so every input costs microseconds and the
//! whole handler path up to the engine is exercised. `load_weights` reads only under an empty
//! weights root.
#![no_main]
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use lockstep_engine::Engine;
use lockstep_server::api::{parse_json, GenRequest, LoadWeightsRequest};
use lockstep_server::generate::{self, Endpoint};
use lockstep_server::limits::{Limits, Load};
use lockstep_server::metrics::Metrics;
use lockstep_server::scheduler::Scheduler;
use lockstep_server::security::Guard;
use lockstep_server::{native, routes, AppState, ModelInfo, Security};
use tower::ServiceExt;

struct Fixture {
    rt: tokio::runtime::Runtime,
    state: Arc<AppState>,
    router: axum::Router,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("lockstep-fuzz-weights-root-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("weights root");
        let security = Security { weights_root: Some(root), ..Security::open() };
        let guard = Arc::new(Guard::new(security, None, None).expect("guard"));
        let (model, tok) = lockstep_server::state::load_model("default", 0, DType::F32, &Device::Cpu).expect("default model");
        let info = ModelInfo::of("default".into(), &model.cfg);
        let tok = Arc::new(tok);
        let metrics = Arc::new(Metrics::default());
        let (sched, _join) = Scheduler::start_bounded(Engine::new(model), tok.clone(), metrics.clone(), 0);
        let load = Arc::new(Load::new(Limits::default(), 1));
        let state = Arc::new(AppState { sched, tok, info, metrics, device: Device::Cpu, dtype: DType::F32, guard: guard.clone(), load: load.clone() });
        let router = routes::router(state.clone(), guard, load, native::routes());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Fixture { rt, state, router }
    })
}

const PATHS: [&str; 5] = ["/v1/completions", "/v1/chat/completions", "/inference/v1/generate", "/generate", "/v1/load_weights"];

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (sel, body) = data.split_first().map(|(s, b)| (*s, b)).unwrap_or((0, data));
    // the validation functions directly
    if let Ok(req) = GenRequest::parse(body) {
        for ep in [Endpoint::Completions, Endpoint::Chat] {
            if let Ok(plan) = generate::plan(&f.state, &req, ep) {
                assert!(!plan.jobs.is_empty() && plan.n >= 1 && plan.jobs.len() % plan.n == 0);
                assert!(plan.jobs.len() <= generate::MAX_CHOICES);
                for j in &plan.jobs {
                    assert!(j.params.max_tokens > 0 && !j.prompt.is_empty());
                    assert!(j.prompt.len() + j.params.max_tokens <= f.state.info.context);
                    assert!(j.params.temperature.is_finite() && j.params.temperature >= 0.0);
                    assert!(j.params.top_p > 0.0 && j.params.top_p <= 1.0);
                    assert!(j.prompt.iter().all(|&t| (t as usize) < f.state.info.vocab_size));
                }
            }
        }
    }
    let _ = parse_json::<LoadWeightsRequest>(body);
    // the router, end to end
    let path = PATHS[sel as usize % PATHS.len()];
    let req = Request::post(path)
        .header("host", "localhost")
        .header("content-type", if sel & 0x80 == 0 { "application/json" } else { "text/plain" })
        .body(Body::from(body.to_vec()))
        .expect("request");
    let (status, bytes) = f.rt.block_on(async {
        let resp = f.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        (status, axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body"))
    });
    assert_ne!(status, StatusCode::OK, "nothing can be generated (max_waiting = 0): {path} {}", String::from_utf8_lossy(body));
    assert!(status.is_client_error() || status.is_server_error(), "{status}");
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    assert!(v["error"]["message"].is_string(), "{status}: {v}");
});
