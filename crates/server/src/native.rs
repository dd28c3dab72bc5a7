//! The token-in-token-out endpoints RL frameworks call instead of the OpenAI ones.
//!
//! * `POST /inference/v1/generate` — vLLM's (`vllm/entrypoints/serve/disagg/protocol.py`:
//!   `GenerateRequest{token_ids, sampling_params, model, stream}` → `GenerateResponse{request_id,
//!   choices: [{index, logprobs, finish_reason, token_ids, routed_experts}], usage}`), which
//!   prime-rl serves (`src/prime_rl/inference/vllm/serving_tokens.py`). `sampling_params` takes
//!   the completions fields (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `n`, `stop`,
//!   `stop_token_ids`, `ignore_eos`, `logprobs`, `routed_experts_prompt_start`,
//!   `routed_experts_format`: `vllm` (base64 `.npy`), `prime-rl` (`{data, shape, start, dtype}`)
//!   or `lockstep`). Non-streaming.
//! * `POST /generate` — SGLang's (`python/sglang/srt/managers/io_struct.py`
//!   `GenerateReqInput{text | input_ids, sampling_params{max_new_tokens, temperature, top_p,
//!   top_k, stop, stop_token_ids, ignore_eos, n}, return_logprob, top_logprobs_num,
//!   return_routed_experts, routed_experts_start_len}`) → `{text, output_ids, meta_info{id,
//!   finish_reason, prompt_tokens, completion_tokens, cached_tokens, output_token_logprobs,
//!   routed_experts (base64 int32), routed_experts_start_len, weight_version}}`, a list for
//!   several prompts or `n > 1`. Non-streaming.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lockstep_engine::Completion;
use lockstep_trace::interop::sglang as sgl;
use lockstep_trace::RouteTrace;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{self, GenRequest, Prompt, Stop};
use crate::error::ApiError;
use crate::generate::{self, chat_logprobs, final_text, route_fields, token_rows, Endpoint};
use crate::state::{now, AppState};

#[derive(Deserialize)]
struct TitoRequest {
    token_ids: Option<Vec<u32>>,
    sampling_params: Option<serde_json::Map<String, Value>>,
    model: Option<String>,
    stream: Option<bool>,
    request_id: Option<String>,
}

fn stream_refused(stream: Option<bool>) -> Result<(), ApiError> {
    if stream == Some(true) {
        return Err(ApiError::invalid("stream", "not supported on this endpoint (use /v1/completions to stream)"));
    }
    Ok(())
}

/// `POST /inference/v1/generate`.
pub async fn tito(State(st): State<Arc<AppState>>, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    let t0 = Instant::now();
    let r: Result<Response, ApiError> = async {
        crate::security::require_json(&headers)?;
        let req: TitoRequest = api::parse_json(&body)?;
        stream_refused(req.stream)?;
        let tokens = req.token_ids.ok_or_else(|| ApiError::invalid("token_ids", "required"))?;
        let sp = Value::Object(req.sampling_params.unwrap_or_default());
        let mut g: GenRequest = api::parse_json(sp.to_string().as_bytes()).map_err(|e| ApiError {
            message: format!("sampling_params.{}", e.message),
            param: e.param.map(|p| format!("sampling_params.{p}")),
            ..e
        })?;
        if g.prompt.is_some() || g.messages.is_some() {
            return Err(ApiError::invalid("sampling_params", "prompt / messages do not belong in sampling_params"));
        }
        if g.stream == Some(true) {
            return Err(ApiError::invalid("sampling_params.stream", "not supported on this endpoint"));
        }
        g.prompt = Some(Prompt::Tokens(tokens));
        g.model = req.model;
        let plan = generate::plan(&st, &g, Endpoint::Completions)?;
        let done = crate::routes::complete(&st, &plan, t0).await?;
        let mut choices = Vec::with_capacity(done.len());
        for (i, c) in done.iter().enumerate() {
            let (_, reason) = final_text(&st, c, &plan.jobs[i].stops);
            let mut ext = route_fields(&st, &plan, c)?;
            ext.prompt_token_ids = None;
            let logprobs = plan.logprobs.map(|_| json!({"content": chat_logprobs(&st, &token_rows(c), plan.token_id_keys)}));
            let mut ch = json!({"index": i, "logprobs": logprobs, "finish_reason": reason});
            merge(&mut ch, serde_json::to_value(ext).unwrap_or_default());
            choices.push(ch);
        }
        let usage = crate::routes::usage(&plan, &done);
        let id = req.request_id.unwrap_or_else(|| crate::routes::new_id("gen"));
        Ok(Json(json!({"request_id": id, "model": st.info.name, "created": now(), "choices": choices, "usage": usage, "prompt_logprobs": null})).into_response())
    }
    .await;
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request("/inference/v1/generate", resp.status().as_u16());
    resp
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

#[derive(Deserialize, Default)]
struct SglSampling {
    max_new_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stop: Option<Stop>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    n: Option<u32>,
    seed: Option<u64>,
    sampling_seed: Option<u64>,
    min_new_tokens: Option<Value>,
    repetition_penalty: Option<Value>,
    min_p: Option<Value>,
    json_schema: Option<Value>,
    regex: Option<Value>,
    ebnf: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SglText {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SglIds {
    One(Vec<u32>),
    Many(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct SglRequest {
    text: Option<SglText>,
    input_ids: Option<SglIds>,
    sampling_params: Option<SglSampling>,
    return_logprob: Option<bool>,
    top_logprobs_num: Option<u32>,
    return_routed_experts: Option<bool>,
    routed_experts_start_len: Option<usize>,
    stream: Option<bool>,
    model: Option<String>,
}

/// SGLang's `meta_info.routed_experts`: base64 int32, rows `[start, N - 1)`, every decoder layer.
fn sglang_routes(st: &AppState, full: &RouteTrace, start: usize) -> Result<Value, ApiError> {
    let t = generate::from_start(full, start)?;
    let (v, _) = sgl::to_json(&t, &generate::full_layers(st)).map_err(|e| ApiError::internal(format!("routed_experts: {e}")))?;
    Ok(v["meta_info"]["routed_experts"].clone())
}

/// `POST /generate` (SGLang).
pub async fn sglang(State(st): State<Arc<AppState>>, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    let t0 = Instant::now();
    let r: Result<Response, ApiError> = async {
        crate::security::require_json(&headers)?;
        let req: SglRequest = api::parse_json(&body)?;
        stream_refused(req.stream)?;
        let sp = req.sampling_params.unwrap_or_default();
        for (name, v, noop) in [
            ("sampling_params.min_new_tokens", &sp.min_new_tokens, Some(json!(0))),
            ("sampling_params.repetition_penalty", &sp.repetition_penalty, Some(json!(1.0))),
            ("sampling_params.min_p", &sp.min_p, Some(json!(0.0))),
            ("sampling_params.json_schema", &sp.json_schema, None),
            ("sampling_params.regex", &sp.regex, None),
            ("sampling_params.ebnf", &sp.ebnf, None),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
                if noop.as_ref().is_none_or(|n| n.as_f64() != v.as_f64()) {
                    return Err(ApiError::invalid(name, format!("{v} is not supported by lockstep")));
                }
            }
        }
        let (prompt, batch) = match (req.text, req.input_ids) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("input_ids", "give text or input_ids, not both")),
            (Some(SglText::One(s)), None) => (Prompt::Text(s), false),
            (Some(SglText::Many(v)), None) => (Prompt::Texts(v), true),
            (None, Some(SglIds::One(v))) => (Prompt::Tokens(v), false),
            (None, Some(SglIds::Many(v))) => (Prompt::TokenLists(v), true),
            (None, None) => return Err(ApiError::invalid("text", "required (or input_ids)")),
        };
        let g = GenRequest {
            model: req.model,
            prompt: Some(prompt),
            max_tokens: Some(sp.max_new_tokens.unwrap_or(128)),
            temperature: sp.temperature,
            top_p: sp.top_p,
            top_k: sp.top_k,
            seed: sp.sampling_seed.or(sp.seed),
            n: sp.n,
            stop: sp.stop,
            stop_token_ids: sp.stop_token_ids,
            ignore_eos: sp.ignore_eos,
            logprobs: req.return_logprob.unwrap_or(false).then(|| json!(req.top_logprobs_num.unwrap_or(0))),
            return_routed_experts: Some(false),
            ..GenRequest::default()
        };
        let mut plan = generate::plan(&st, &g, Endpoint::Completions).map_err(|e| match e.param.as_deref() {
            Some("max_tokens") => ApiError::invalid("sampling_params.max_new_tokens", e.message.trim_start_matches("max_tokens: ").to_string()),
            _ => e,
        })?;
        let start = req.routed_experts_start_len.unwrap_or(0);
        if let Some(p) = plan.jobs.iter().find(|j| start > j.prompt.len()) {
            return Err(ApiError::invalid("routed_experts_start_len", format!("{start} is beyond the prompt ({} tokens)", p.prompt.len())));
        }
        plan.routes_start = 0;
        let done = crate::routes::complete(&st, &plan, t0).await?;
        let mut out = Vec::with_capacity(done.len());
        for (i, c) in done.iter().enumerate() {
            out.push(sgl_choice(&st, c, &plan.jobs[i].stops, plan.logprobs.is_some(), req.return_routed_experts.unwrap_or(false), start)?);
        }
        Ok(if batch || out.len() > 1 { Json(Value::Array(out)) } else { Json(out.remove(0)) }.into_response())
    }
    .await;
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request("/generate", resp.status().as_u16());
    resp
}

fn sgl_choice(st: &AppState, c: &Completion, stops: &[String], logprobs: bool, routes: bool, start: usize) -> Result<Value, ApiError> {
    let (text, reason) = final_text(st, c, stops);
    let finish = if reason == "length" { json!({"type": "length", "length": c.tokens.len()}) } else { json!({"type": "stop", "matched": c.tokens.last()}) };
    let mut mi = json!({
        "id": crate::routes::new_id("sgl"),
        "finish_reason": finish,
        "prompt_tokens": c.prompt.len(),
        "completion_tokens": c.tokens.len(),
        "cached_tokens": 0,
        "weight_version": c.policy_version.to_string(),
    });
    if logprobs {
        mi["output_token_logprobs"] = json!(c.tokens.iter().zip(&c.logprobs).map(|(&t, &l)| json!([l, t, null])).collect::<Vec<_>>());
    }
    if routes {
        let full = c.routes.as_ref().ok_or_else(|| ApiError::invalid("return_routed_experts", "route capture is off on this server (--no-capture)"))?;
        mi["routed_experts"] = sglang_routes(st, full, start)?;
        if start > 0 {
            mi["routed_experts_start_len"] = json!(start);
        }
    }
    Ok(json!({"text": text, "output_ids": c.tokens, "meta_info": mi}))
}

/// The native generate endpoints: vLLM's token-in-token-out `/inference/v1/generate` and
/// SGLang's `/generate`.
pub fn routes() -> axum::Router<std::sync::Arc<crate::state::AppState>> {
    axum::Router::new().route("/inference/v1/generate", axum::routing::post(tito)).route("/generate", axum::routing::post(sglang))
}
