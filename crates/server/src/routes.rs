//! HTTP handlers: `/v1/completions` and `/v1/chat/completions` (whole responses or SSE
//! streams), the token-in-token-out `/inference/v1/generate` (vLLM / prime-rl) and SGLang's
//! `/generate` ([`crate::native`]), `/v1/models`, `/v1/load_weights`, `/health`, `/metrics`;
//! anything else is a 404 with an OpenAI-style error body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use lockstep_engine::Completion;
use serde::Serialize;
use serde_json::json;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use crate::api::{self, AssistantMessage, ChatChoice, ChatChunkChoice, ChatLogprobs, CompletionChoice, Delta, GenRequest, LoadWeightsRequest, Usage};
use crate::error::ApiError;
use crate::generate::{self, chat_logprobs, completion_logprobs, final_text, route_fields, token_rows, Endpoint, Plan};
use crate::scheduler::{Event, Events};
use crate::state::{now, same_shape, AppState};
use crate::text::StreamText;

type St = State<Arc<AppState>>;

/// The routes behind the [`crate::security::guard`] middleware (`Host` / `Origin`, keys), then
/// [`crate::limits::admission`] (draining, body timeout), with `more` (the native generate
/// endpoints, `crate::native::routes`) merged in.
pub fn router(state: Arc<AppState>, guard: Arc<crate::security::Guard>, load: Arc<crate::limits::Load>, more: Router<Arc<AppState>>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/load_weights", post(load_weights))
        .merge(more)
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(load, crate::limits::admission))
        .layer(axum::middleware::from_fn_with_state(guard, crate::security::guard))
        .with_state(state)
}

async fn fallback(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::invalid("", format!("{method} is not allowed on {}", uri.path())) }
}

/// `{"status": "ok" | "overloaded" | "draining", ...}`: 200 while serving (overloaded too: the
/// server is alive, a liveness probe must not restart it), 503 while draining (a readiness
/// probe takes it out of rotation).
async fn health(State(st): St) -> Response {
    let waiting = st.metrics.waiting.load(Relaxed);
    let h = st.load.health(waiting as usize);
    let code = if h == crate::limits::Health::Draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = json!({
        "status": h.as_str(),
        "policy_version": st.metrics.policy_version.load(Relaxed),
        "running": st.metrics.running.load(Relaxed),
        "waiting": waiting,
        "max_waiting": st.load.max_waiting,
        "connections": st.load.connections.load(Relaxed),
        "max_connections": st.load.limits.max_connections,
    });
    (code, Json(body)).into_response()
}

/// When a generation request started at `t0` must be done (`request_timeout`).
pub(crate) fn deadline(st: &AppState, t0: Instant) -> Option<tokio::time::Instant> {
    st.load.limits.request_timeout.map(|d| tokio::time::Instant::from_std(t0) + d)
}

/// `fut` within the request deadline (504 past it; dropping `fut` drops its event channels,
/// so the engine aborts its sequences and frees their blocks).
pub(crate) async fn within<T>(st: &AppState, t0: Instant, fut: impl std::future::Future<Output = Result<T, ApiError>>) -> Result<T, ApiError> {
    match (deadline(st, t0), st.load.limits.request_timeout) {
        (Some(at), Some(d)) => tokio::time::timeout_at(at, fut).await.unwrap_or_else(|_| Err(ApiError::request_timeout(d.as_secs_f64()))),
        _ => fut.await,
    }
}

async fn metrics(State(st): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

async fn models(State(st): St) -> Json<serde_json::Value> {
    let i = &st.info;
    Json(json!({"object": "list", "data": [{
        "id": i.name, "object": "model", "created": i.created, "owned_by": "lockstep",
        "max_model_len": i.context, "vocab_size": i.vocab_size, "num_experts": i.num_experts,
        "top_k": i.top_k, "moe_layers": i.moe_layers, "fingerprint": format!("{:016x}", i.fingerprint),
        "policy_version": st.metrics.policy_version.load(Relaxed),
    }]}))
}

async fn load_weights(State(st): St, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    let r: Result<_, ApiError> = async {
        crate::security::require_json(&headers)?;
        let req: LoadWeightsRequest = api::parse_json(&body)?;
        // a cheap early refusal; the engine thread checks again when it swaps
        let current = st.metrics.policy_version.load(Relaxed);
        crate::scheduler::next_version(current, req.version, st.guard.security.allow_same_version)?;
        let path = st.guard.checkpoint_dir(&req.path)?;
        let (dev, dtype, allow_unused) = (st.device.clone(), st.dtype, st.allow_unused);
        let model = tokio::task::spawn_blocking(move || crate::state::load_weights(&path, dtype, &dev, allow_unused))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::invalid("path", st.guard.redact(&e.to_string())))?;
        if !same_shape(&st.info.cfg, &model.cfg) {
            return Err(ApiError::invalid("path", "config.json differs from the served model's (architecture or shapes)"));
        }
        let v = st.sched.load_weights(model, req.version, st.guard.security.allow_same_version).await?;
        Ok(Json(json!({"status": "ok", "policy_version": v, "path": req.path})))
    }
    .await;
    let resp = r.map(IntoResponse::into_response).unwrap_or_else(IntoResponse::into_response);
    st.metrics.request("/v1/load_weights", resp.status().as_u16());
    resp
}

async fn completions(State(st): St, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    if let Err(e) = crate::security::require_json(&headers) {
        return e.into_response();
    }
    serve(st, body, Endpoint::Completions).await
}

async fn chat(State(st): St, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    if let Err(e) = crate::security::require_json(&headers) {
        return e.into_response();
    }
    serve(st, body, Endpoint::Chat).await
}

async fn serve(st: Arc<AppState>, body: Bytes, ep: Endpoint) -> Response {
    let t0 = Instant::now();
    let resp = match within(&st, t0, run(st.clone(), &body, ep, t0)).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let name = if ep == Endpoint::Chat { "/v1/chat/completions" } else { "/v1/completions" };
    st.metrics.request(name, resp.status().as_u16());
    resp
}

async fn run(st: Arc<AppState>, body: &[u8], ep: Endpoint, t0: Instant) -> Result<Response, ApiError> {
    let req = GenRequest::parse(body)?;
    let plan = generate::plan(&st, &req, ep)?;
    let mut rxs = st.sched.submit(plan.jobs.clone())?;
    // the first event of every job: a job the engine refused answers here, with its status
    let mut first = Vec::with_capacity(rxs.len());
    for rx in rxs.iter_mut() {
        match rx.recv().await {
            Some(Event::Failed(e)) => return Err(e),
            Some(ev) => first.push(ev),
            None => return Err(ApiError::unavailable("the engine has stopped")),
        }
    }
    st.metrics.ttft.observe(t0.elapsed().as_secs_f64());
    if plan.stream {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(pump(st, plan, ep, rxs, first, tx, t0));
        return Ok(Sse::new(ReceiverStream::new(rx)).into_response());
    }
    let done = finish(rxs, first).await?;
    let resp = whole(&st, &plan, ep, &done)?;
    st.metrics.latency.observe(t0.elapsed().as_secs_f64());
    Ok(resp)
}

/// Submit a plan's jobs and wait for every completion (a refused job answers with its error).
pub(crate) async fn complete(st: &AppState, plan: &Plan, t0: Instant) -> Result<Vec<Completion>, ApiError> {
    within(st, t0, complete_now(st, plan, t0)).await
}

async fn complete_now(st: &AppState, plan: &Plan, t0: Instant) -> Result<Vec<Completion>, ApiError> {
    let mut rxs = st.sched.submit(plan.jobs.clone())?;
    let mut first = Vec::with_capacity(rxs.len());
    for rx in rxs.iter_mut() {
        match rx.recv().await {
            Some(Event::Failed(e)) => return Err(e),
            Some(ev) => first.push(ev),
            None => return Err(ApiError::unavailable("the engine has stopped")),
        }
    }
    st.metrics.ttft.observe(t0.elapsed().as_secs_f64());
    let done = finish(rxs, first).await?;
    st.metrics.latency.observe(t0.elapsed().as_secs_f64());
    Ok(done)
}

async fn finish(rxs: Vec<Events>, first: Vec<Event>) -> Result<Vec<Completion>, ApiError> {
    let mut done: Vec<Completion> = Vec::with_capacity(rxs.len());
    for (mut rx, ev) in rxs.into_iter().zip(first) {
        let mut ev = Some(ev);
        loop {
            let e = match ev.take() {
                Some(e) => e,
                None => rx.recv().await.ok_or_else(|| ApiError::unavailable("the engine has stopped"))?,
            };
            match e {
                Event::Token(_) => {}
                Event::Done(c) => {
                    done.push(*c);
                    break;
                }
                Event::Failed(e) => return Err(e),
            }
        }
    }
    Ok(done)
}

pub(crate) fn usage(plan: &Plan, done: &[Completion]) -> Usage {
    let n = plan.n.max(1);
    let prompt_tokens = done.iter().step_by(n).map(|c| c.prompt.len()).sum();
    let completion_tokens = done.iter().map(|c| c.tokens.len()).sum();
    Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
}

fn whole(st: &AppState, plan: &Plan, ep: Endpoint, done: &[Completion]) -> Result<Response, ApiError> {
    let usage = Some(usage(plan, done));
    let created = now();
    let model = st.info.name.clone();
    Ok(match ep {
        Endpoint::Completions => {
            let mut choices = Vec::with_capacity(done.len());
            for (i, c) in done.iter().enumerate() {
                let (text, reason) = final_text(st, c, &plan.jobs[i].stops);
                let logprobs = plan.logprobs.map(|_| completion_logprobs(st, &token_rows(c), 0, plan.token_id_keys).0);
                choices.push(CompletionChoice { index: i, text, logprobs, finish_reason: Some(reason.into()), ext: Some(route_fields(st, plan, c)?) });
            }
            Json(api::Response { id: new_id("cmpl"), object: "text_completion".into(), created, model, choices, usage, prompt_token_ids: None }).into_response()
        }
        Endpoint::Chat => {
            let mut choices = Vec::with_capacity(done.len());
            for (i, c) in done.iter().enumerate() {
                let (text, reason) = final_text(st, c, &plan.jobs[i].stops);
                let logprobs = plan.logprobs.map(|_| ChatLogprobs { content: chat_logprobs(st, &token_rows(c), plan.token_id_keys) });
                let message = AssistantMessage { role: "assistant".into(), content: text };
                let mut ext = route_fields(st, plan, c)?;
                ext.prompt_token_ids = None; // at the top of a chat response, as vLLM
                choices.push(ChatChoice { index: i, message, logprobs, finish_reason: Some(reason.into()), ext: Some(ext) });
            }
            let prompt_token_ids = done.first().map(|c| c.prompt.clone());
            Json(api::Response { id: new_id("chatcmpl"), object: "chat.completion".into(), created, model, choices, usage, prompt_token_ids }).into_response()
        }
    })
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

struct Head {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
}

impl Head {
    fn chunk<C>(&self, choices: Vec<C>) -> api::Response<C> {
        api::Response { id: self.id.clone(), object: self.object.into(), created: self.created, model: self.model.clone(), choices, usage: None, prompt_token_ids: None }
    }
}

type Out = tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>;

async fn send<T: Serialize>(tx: &Out, v: &T) -> bool {
    let data = serde_json::to_string(v).unwrap_or_default();
    tx.send(Ok(SseEvent::default().data(data))).await.is_ok()
}

/// Stream chunks of every choice as their tokens arrive; the final chunk of a choice carries
/// its finish reason and lockstep's fields (token ids, routes). Ends with `[DONE]`.
async fn pump(st: Arc<AppState>, plan: Plan, ep: Endpoint, rxs: Vec<Events>, first: Vec<Event>, tx: Out, t0: Instant) {
    let n = rxs.len();
    let (id, created, model) = (new_id(if ep == Endpoint::Chat { "chatcmpl" } else { "cmpl" }), now(), st.info.name.clone());
    let object = if ep == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
    let head = Head { id, object, created, model };
    let mut merged = futures_util::stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))));
    let mut pending: VecDeque<(usize, Event)> = first.into_iter().enumerate().collect();
    let (mut texts, mut tokens, mut offsets) = ((0..n).map(|_| StreamText::default()).collect::<Vec<_>>(), vec![Vec::new(); n], vec![0usize; n]);
    let mut done: Vec<Option<Completion>> = (0..n).map(|_| None).collect();
    let mut finished = 0;
    if ep == Endpoint::Chat {
        for i in 0..n {
            let delta = Delta { role: Some("assistant".into()), content: Some(String::new()) };
            let mut chunk = head.chunk(vec![ChatChunkChoice { index: i, delta, logprobs: None, finish_reason: None, ext: None }]);
            if i == 0 {
                chunk.prompt_token_ids = plan.jobs.first().map(|j| j.prompt.clone());
                // the first chunk, as vLLM
            }
            if !send(&tx, &chunk).await {
                return;
            }
        }
    }
    let deadline = deadline(&st, t0);
    while finished < n {
        let next = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, merged.next()).await.ok(),
                None => Some(merged.next().await),
            }
        };
        let (i, ev) = match pending.pop_front() {
            Some(x) => x,
            None => match next.await {
                None => {
                    // past request_timeout: dropping the channels aborts the sequences
                    let secs = st.load.limits.request_timeout.map_or(0.0, |d| d.as_secs_f64());
                    let _ = send(&tx, &ApiError::request_timeout(secs).body()).await;
                    return;
                }
                Some(Some(x)) => x,
                Some(None) => {
                    let _ = send(&tx, &ApiError::unavailable("the engine has stopped").body()).await;
                    return;
                }
            },
        };
        let stops = &plan.jobs[i].stops;
        let (delta, row, finish, ext) = match ev {
            Event::Token(s) => {
                tokens[i].push(s.token);
                let delta = texts[i].delta(&st.tok.decode(&tokens[i]), stops, false);
                if delta.is_empty() && plan.logprobs.is_none() {
                    continue;
                }
                (delta, Some((s.token, s.logprob, s.top_logprobs)), None, None)
            }
            Event::Done(c) => {
                let (_, reason) = final_text(&st, &c, stops);
                let delta = texts[i].delta(&st.tok.decode(&c.tokens), stops, true);
                let ext = match route_fields(&st, &plan, &c) {
                    Ok(mut f) => {
                        if ep == Endpoint::Chat {
                            f.prompt_token_ids = None;
                        }
                        f
                    }
                    Err(e) => {
                        let _ = send(&tx, &e.body()).await;
                        return;
                    }
                };
                done[i] = Some(*c);
                finished += 1;
                (delta, None, Some(reason.to_string()), Some(ext))
            }
            Event::Failed(e) => {
                let _ = send(&tx, &e.body()).await;
                return;
            }
        };
        let ok = match ep {
            Endpoint::Completions => {
                let logprobs = row.as_ref().filter(|_| plan.logprobs.is_some()).map(|(t, l, top)| {
                    let (lp, off) = completion_logprobs(&st, &[(*t, *l, top.as_slice())], offsets[i], plan.token_id_keys);
                    offsets[i] = off;
                    lp
                });
                send(&tx, &head.chunk(vec![CompletionChoice { index: i, text: delta, logprobs, finish_reason: finish, ext }])).await
            }
            Endpoint::Chat => {
                let logprobs = row
                    .as_ref()
                    .filter(|_| plan.logprobs.is_some())
                    .map(|(t, l, top)| ChatLogprobs { content: chat_logprobs(&st, &[(*t, *l, top.as_slice())], plan.token_id_keys) });
                let delta = Delta { role: None, content: (!delta.is_empty()).then_some(delta) };
                send(&tx, &head.chunk(vec![ChatChunkChoice { index: i, delta, logprobs, finish_reason: finish, ext }])).await
            }
        };
        if !ok {
            return; // the client went away: dropping the event channels ends its requests
        }
    }
    if plan.include_usage {
        let mut last = head.chunk(Vec::<CompletionChoice>::new());
        last.usage = Some(usage(&plan, &done.into_iter().flatten().collect::<Vec<_>>()));
        if !send(&tx, &last).await {
            return;
        }
    }
    st.metrics.latency.observe(t0.elapsed().as_secs_f64());
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
}
