//! From a request body to engine jobs (every check names its field), and from a completion
//! back to a choice: text under stop strings, log-probabilities (top-n keyed so distinct
//! tokens never collapse, `text_offset` in characters), routes (a base64 `.lstrace` file, and
//! `routed_experts` as current vLLM writes it or in lockstep's nested lists).

use std::sync::atomic::Ordering::Relaxed;

use base64::Engine as _;
use lockstep_engine::{Completion, FinishReason, SamplingParams};

use crate::api::{ChatTokenLogprob, CompletionLogprobs, Content, GenRequest, Prompt, RouteFields, Stop, TopLogprob};
use crate::error::ApiError;
use crate::scheduler::Job;
use crate::state::AppState;
use crate::text::{find_stop, visible};
use crate::tokenizer::TemplateMessage;
use lockstep_trace::interop::{vllm, ExportMeta};
use lockstep_trace::RouteTrace;
use serde_json::Value;

/// One sampled token: id, log-probability, top-n alternatives.
pub type TokenRow<'a> = (u32, f32, &'a [(u32, f32)]);

/// Most prompts × `n` in one request.
pub const MAX_CHOICES: usize = 256;
/// Most alternatives per token (`logprobs` / `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// A checked request: one job per choice (prompt `i`, sample `j` → choice `i·n + j`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub jobs: Vec<Job>,
    /// samples per prompt
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// top-n alternatives per token when log-probabilities are asked for
    pub logprobs: Option<usize>,
    pub routed_experts: RoutedForm,
    pub router_probs: bool,
    pub routes_start: usize,
    /// log-probability tokens as `token_id:{id}` (vLLM's `return_tokens_as_token_ids`)
    pub token_id_keys: bool,
}

/// How `routed_experts` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutedForm {
    Off,
    /// current vLLM: base64 `.npy`, rows `[start, N - 1)`, every decoder layer
    Vllm,
    /// lockstep: nested lists of every token from `start`, MoE layers (`moe_layers`)
    Lockstep,
    /// prime-rl's `{data, shape, start, dtype}` (`src/prime_rl/inference/vllm/routed_experts.py`)
    PrimeRl,
}

/// Request fields lockstep refuses unless absent, null or at their no-op value (the value
/// given here, `None`: any value is refused).
pub const UNSUPPORTED: &[(&str, Option<&str>)] = &[
    ("response_format", Some(r#"{"type":"text"}"#)),
    ("structured_outputs", None),
    ("guided_json", None),
    ("guided_regex", None),
    ("guided_choice", None),
    ("guided_grammar", None),
    ("logits_processors", Some("[]")),
    ("prompt_embeds", None),
    ("use_beam_search", Some("false")),
    ("min_tokens", Some("0")),
    ("repetition_penalty", Some("1.0")),
    ("min_p", Some("0.0")),
    ("bad_words", Some("[]")),
    ("allowed_token_ids", None),
    ("prompt_logprobs", None),
    ("logprob_token_ids", None),
    ("include_stop_str_in_output", Some("false")),
    ("continue_final_message", Some("false")),
    ("tool_choice", Some(r#""none""#)),
    ("truncate_prompt_tokens", None),
];

fn unsupported_fields(req: &GenRequest) -> Result<(), ApiError> {
    let vals = [
        &req.response_format,
        &req.structured_outputs,
        &req.guided_json,
        &req.guided_regex,
        &req.guided_choice,
        &req.guided_grammar,
        &req.logits_processors,
        &req.prompt_embeds,
        &req.use_beam_search,
        &req.min_tokens,
        &req.repetition_penalty,
        &req.min_p,
        &req.bad_words,
        &req.allowed_token_ids,
        &req.prompt_logprobs,
        &req.logprob_token_ids,
        &req.include_stop_str_in_output,
        &req.continue_final_message,
        &req.tool_choice,
        &req.truncate_prompt_tokens,
    ];
    for (&(name, noop), v) in UNSUPPORTED.iter().zip(vals) {
        let Some(v) = v.as_ref().filter(|v| !v.is_null()) else {
            continue;
        };
        let ok = noop.and_then(|n| serde_json::from_str::<Value>(n).ok()).is_some_and(|n| match (&n, v) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => &n == v,
        });
        if !ok {
            return Err(ApiError::invalid(name, format!("{v} is not supported by lockstep (remove the field)")));
        }
    }
    Ok(())
}

fn unsupported(param: &str) -> ApiError {
    ApiError::invalid(param, "not supported by lockstep")
}

/// Check everything that does not need the engine.
pub fn plan(state: &AppState, req: &GenRequest, ep: Endpoint) -> Result<Plan, ApiError> {
    let info = &state.info;
    if let Some(m) = &req.model {
        if m != &info.name {
            return Err(ApiError::model_not_found(m, &info.name));
        }
    }
    if req.echo == Some(true) {
        return Err(unsupported("echo"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(unsupported("best_of"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix"));
    }
    for (name, v) in [("presence_penalty", req.presence_penalty), ("frequency_penalty", req.frequency_penalty)] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(unsupported(name));
        }
    }
    if req.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("tools"));
    }
    unsupported_fields(req)?;
    let routed_experts = match (req.return_routed_experts, req.routed_experts_format.as_deref()) {
        (Some(false), _) => RoutedForm::Off,
        (_, None | Some("vllm")) => RoutedForm::Vllm,
        (_, Some("lockstep")) => RoutedForm::Lockstep,
        (_, Some("prime-rl")) => RoutedForm::PrimeRl,
        (_, Some(other)) => {
            return Err(ApiError::invalid("routed_experts_format", format!("{other:?}: expected \"vllm\", \"prime-rl\" or \"lockstep\"")))
        }
    };
    let (start_param, start) = match (req.routes_prompt_start, req.routed_experts_prompt_start, req.routed_experts_start_len) {
        (Some(a), b, c) if b.is_some_and(|b| b != a) || c.is_some_and(|c| c != a) => {
            return Err(ApiError::invalid("routed_experts_prompt_start", "disagrees with routes_prompt_start / routed_experts_start_len"))
        }
        (None, Some(b), Some(c)) if b != c => {
            return Err(ApiError::invalid("routed_experts_start_len", "disagrees with routed_experts_prompt_start"))
        }
        (Some(a), _, _) => ("routes_prompt_start", a),
        (None, Some(b), _) => ("routed_experts_prompt_start", b),
        (None, None, Some(c)) => ("routed_experts_start_len", c),
        (None, None, None) => ("routes_prompt_start", 0),
    };
    let prompts = match ep {
        Endpoint::Completions => completion_prompts(state, req)?,
        Endpoint::Chat => vec![chat_prompt(state, req)?],
    };
    let n = req.n.unwrap_or(1) as usize;
    if n == 0 || n * prompts.len() > MAX_CHOICES {
        return Err(ApiError::invalid("n", format!("must be in 1..={} (prompts × n)", MAX_CHOICES / prompts.len().max(1))));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::invalid("temperature", "must be a finite number >= 0"));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "must be in (0, 1]"));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 && (k as u64) <= info.vocab_size as u64 => k as usize,
        Some(k) if k > 0 => return Err(ApiError::invalid("top_k", format!("{k}: at most vocab_size {}", info.vocab_size))),
        Some(_) => return Err(ApiError::invalid("top_k", "must be > 0, or 0 / -1 for all tokens")),
    };
    let stops: Vec<String> = match &req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 16 || stops.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", "at most 16 non-empty strings"));
    }
    let mut stop_ids = req.stop_token_ids.clone().unwrap_or_default();
    if let Some(&t) = stop_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(ApiError::invalid("stop_token_ids", format!("token id {t} >= vocab_size {}", info.vocab_size)));
    }
    if !req.ignore_eos.unwrap_or(false) {
        stop_ids.extend(state.tok.eos_token_ids.iter().copied());
    }
    let logprobs = logprobs(req, ep)?;
    let max_tokens = match ep {
        Endpoint::Completions => req.max_tokens,
        Endpoint::Chat => req.max_completion_tokens.or(req.max_tokens),
    };
    let seed = req.seed.unwrap_or_else(rand::random);
    let stream = req.stream.unwrap_or(false);
    let mut jobs = Vec::with_capacity(prompts.len() * n);
    for prompt in prompts {
        if start > prompt.len() {
            return Err(ApiError::invalid(start_param, format!("{start} is beyond the prompt ({} tokens)", prompt.len())));
        }
        let room = info.context.saturating_sub(prompt.len());
        if room == 0 {
            let field = if ep == Endpoint::Chat { "messages" } else { "prompt" };
            return Err(ApiError::invalid(field, format!("{} tokens leave no room in the context of {}", prompt.len(), info.context)));
        }
        let max = match max_tokens {
            Some(0) => return Err(ApiError::invalid("max_tokens", "must be > 0")),
            Some(m) if m as usize > room => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("{m} + {} prompt tokens exceed the context of {} tokens", prompt.len(), info.context),
                ))
            }
            Some(m) => m as usize,
            None if ep == Endpoint::Completions => 16.min(room),
            None => room,
        };
        for j in 0..n {
            let params = SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                seed: seed.wrapping_add(j as u64),
                max_tokens: max,
                stop_token_ids: stop_ids.clone(),
                logprobs: logprobs.unwrap_or(0),
            };
            jobs.push(Job { prompt: prompt.clone(), params, stops: stops.clone(), stream });
        }
    }
    Ok(Plan {
        jobs,
        n,
        stream,
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        routed_experts,
        router_probs: req.return_router_probs.unwrap_or(false),
        routes_start: start,
        token_id_keys: req.return_tokens_as_token_ids.unwrap_or(false),
    })
}

fn logprobs(req: &GenRequest, ep: Endpoint) -> Result<Option<usize>, ApiError> {
    use serde_json::Value;
    let range = |param: &str, n: u64| {
        if n as usize > MAX_TOP_LOGPROBS {
            Err(ApiError::invalid(param, format!("at most {MAX_TOP_LOGPROBS}")))
        } else {
            Ok(n as usize)
        }
    };
    match ep {
        Endpoint::Completions => match &req.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => range("logprobs", n.as_u64().unwrap_or(0)).map(Some),
            Some(_) => Err(ApiError::invalid("logprobs", format!("expected an integer from 0 to {MAX_TOP_LOGPROBS}"))),
        },
        Endpoint::Chat => match &req.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {
                if req.top_logprobs.is_some_and(|n| n > 0) {
                    return Err(ApiError::invalid("top_logprobs", "needs logprobs: true"));
                }
                Ok(None)
            }
            Some(Value::Bool(true)) => range("top_logprobs", req.top_logprobs.unwrap_or(0) as u64).map(Some),
            Some(_) => Err(ApiError::invalid("logprobs", "expected a boolean")),
        },
    }
}

fn checked_ids(state: &AppState, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "empty prompt"));
    }
    let v = state.info.vocab_size;
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= v) {
        return Err(ApiError::invalid("prompt", format!("token id {t} >= vocab_size {v}")));
    }
    Ok(ids)
}

fn encode(state: &AppState, text: &str, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
    state.tok.encode(text, special).map_err(|e| ApiError::invalid(param, format!("tokenizer: {e}")))
}

fn completion_prompts(state: &AppState, req: &GenRequest) -> Result<Vec<Vec<u32>>, ApiError> {
    if req.messages.is_some() {
        return Err(ApiError::invalid("messages", "not a field of /v1/completions (use /v1/chat/completions)"));
    }
    let lists = match &req.prompt {
        None => return Err(ApiError::invalid("prompt", "required")),
        Some(Prompt::Text(s)) => vec![encode(state, s, true, "prompt")?],
        Some(Prompt::Tokens(t)) => vec![t.clone()],
        Some(Prompt::Texts(v)) => v.iter().map(|s| encode(state, s, true, "prompt")).collect::<Result<_, _>>()?,
        Some(Prompt::TokenLists(v)) => v.clone(),
    };
    if lists.is_empty() {
        return Err(ApiError::invalid("prompt", "empty list"));
    }
    lists.into_iter().map(|ids| checked_ids(state, ids)).collect()
}

fn chat_prompt(state: &AppState, req: &GenRequest) -> Result<Vec<u32>, ApiError> {
    if req.prompt.is_some() {
        return Err(ApiError::invalid("prompt", "not a field of /v1/chat/completions (use messages, or /v1/completions)"));
    }
    let msgs = match &req.messages {
        Some(m) if !m.is_empty() => m,
        _ => return Err(ApiError::invalid("messages", "required, at least one message")),
    };
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        if m.role.is_empty() {
            return Err(ApiError::invalid("messages", format!("messages[{i}].role is empty")));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!("messages[{i}]: content part `{kind}` is not supported (text only)"),
                            ))
                        }
                    }
                }
                s
            }
        };
        out.push(TemplateMessage { role: m.role.clone(), content, name: m.name.clone() });
    }
    let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    let text = state
        .tok
        .apply_chat_template(&out, req.add_generation_prompt.unwrap_or(true), &kwargs)
        .map_err(|e| ApiError::invalid("messages", format!("chat template: {e}")))?;
    checked_ids(state, encode(state, &text, false, "messages")?)
}

/// The choice's text (cut before a stop string) and finish reason (`stop` when a stop string
/// or stop token ended it).
pub fn final_text(state: &AppState, c: &Completion, stops: &[String]) -> (String, &'static str) {
    let text = state.tok.decode(&c.tokens);
    let hit = find_stop(&text, stops).is_some();
    let reason = if hit || c.finish == FinishReason::Stop { "stop" } else { "length" };
    (visible(&text, stops, true).to_string(), reason)
}

/// lockstep's fields of a finished choice; counts the trace bytes into the metrics.
pub fn route_fields(state: &AppState, plan: &Plan, c: &Completion) -> Result<RouteFields, ApiError> {
    let mut f = RouteFields {
        prompt_token_ids: Some(c.prompt.clone()),
        token_ids: c.tokens.clone(),
        routes_start: plan.routes_start,
        policy_version: c.policy_version,
        ..RouteFields::default()
    };
    let Some(full) = &c.routes else {
        return Ok(f); // capture off
    };
    let trace = full.tail(plan.routes_start).map_err(|e| ApiError::internal(format!("route trace: {e}")))?;
    let trace = if plan.router_probs { trace } else { trace.without_probs() };
    let bytes = lockstep_trace::encode_file(std::slice::from_ref(&trace));
    state.metrics.capture_bytes.fetch_add(bytes.len() as u64, Relaxed);
    f.routes = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
    match plan.routed_experts {
        RoutedForm::Off => {}
        RoutedForm::Vllm => f.routed_experts = Some(Value::String(vllm_routed_experts(state, full, plan.routes_start)?)),
        RoutedForm::PrimeRl => {
            let t = from_start(full, plan.routes_start)?;
            let (v, _) = lockstep_trace::interop::prime_rl::to_json(&t, None, &full_layers(state)).map_err(internal)?;
            f.routed_experts = Some(v);
        }
        RoutedForm::Lockstep => {
            // every token from the start, MoE layers only, from the same trace
            let (n, nl) = (trace.num_tokens(), trace.num_layers());
            let rows: Vec<Vec<Vec<u32>>> = (0..n).map(|t| (0..nl).map(|l| trace.row_u32(t, l).unwrap_or_default()).collect()).collect();
            f.routed_experts = Some(serde_json::json!(rows));
            if plan.router_probs {
                f.router_probs = Some((0..n).map(|t| (0..nl).map(|l| trace.row_probs(t, l).unwrap_or_default()).collect()).collect());
            }
            f.moe_layers = Some(trace.layers().iter().map(|&l| l as usize).collect());
        }
    }
    Ok(f)
}

/// `routed_experts` as current vLLM writes it: base64 of `np.save` bytes of shape
/// `(N - 1 - start, num_hidden_layers, top_k)`, dense layers' columns 0, uint8 / uint16 / int32
/// by the expert count (`vllm/entrypoints/openai/completion/protocol.py`).
pub fn vllm_routed_experts(state: &AppState, full: &RouteTrace, start: usize) -> Result<String, ApiError> {
    let (s, _) = vllm::to_b64(&from_start(full, start)?, None, &full_layers(state)).map_err(internal)?;
    Ok(s)
}

fn internal(e: lockstep_trace::TraceError) -> ApiError {
    ApiError::internal(format!("routed_experts: {e}"))
}

/// The served model's decoder layers (the columns vLLM / SGLang / prime-rl write).
pub fn full_layers(state: &AppState) -> ExportMeta {
    ExportMeta { num_hidden_layers: Some(state.info.cfg.num_layers as u32), compact: false }
}

/// `full` with the tokens before `start` marked missing (rows from `start` on).
pub fn from_start(full: &RouteTrace, start: usize) -> Result<RouteTrace, ApiError> {
    let n = full.num_tokens();
    let missing: Vec<bool> = (0..n).map(|t| t < start || full.is_missing(t)).collect();
    RouteTrace::new(full.meta().clone(), full.layers().to_vec(), n, full.ids().to_vec(), missing, None).map_err(internal)
}

/// The key of each top-n alternative: its text, or vLLM's `token_id:{id}` when asked for, or
/// where an earlier alternative of the same position already decodes to the same text (so
/// distinct tokens never collapse into one entry).
fn top_keys(state: &AppState, top: &[(u32, f32)], ids: bool) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    top.iter()
        .map(|&(t, _)| {
            let piece = state.tok.token_piece(t).0;
            if ids || !seen.insert(piece.clone()) {
                format!("token_id:{t}")
            } else {
                piece
            }
        })
        .collect()
}

/// Legacy completions log-probabilities of tokens `(id, logprob, top)`, text offsets (in
/// characters, as OpenAI counts them) from `offset` on (returns the offset after them).
pub fn completion_logprobs(state: &AppState, toks: &[TokenRow], mut offset: usize, ids: bool) -> (CompletionLogprobs, usize) {
    let mut out = CompletionLogprobs::default();
    for &(id, lp, top) in toks {
        let (piece, _) = state.tok.token_piece(id);
        out.text_offset.push(offset);
        offset += piece.chars().count();
        out.tokens.push(if ids { format!("token_id:{id}") } else { piece });
        out.token_logprobs.push(lp);
        out.top_logprobs.push(top_keys(state, top, ids).into_iter().zip(top).map(|(k, &(_, l))| (k, serde_json::json!(l))).collect());
    }
    (out, offset)
}

/// Chat log-probabilities of tokens `(id, logprob, top)` (a list: entries never collapse).
pub fn chat_logprobs(state: &AppState, toks: &[TokenRow], ids: bool) -> Vec<ChatTokenLogprob> {
    let name = |t: u32, piece: String| if ids { format!("token_id:{t}") } else { piece };
    toks.iter()
        .map(|&(id, lp, top)| {
            let (token, bytes) = state.tok.token_piece(id);
            let top = top
                .iter()
                .map(|&(t, l)| {
                    let (token, bytes) = state.tok.token_piece(t);
                    TopLogprob { token: name(t, token), logprob: l, bytes }
                })
                .collect();
            ChatTokenLogprob { token: name(id, token), logprob: lp, bytes, top_logprobs: top, token_id: id }
        })
        .collect()
}

/// `(id, logprob, top)` of every completion token.
pub fn token_rows(c: &Completion) -> Vec<TokenRow<'_>> {
    c.tokens
        .iter()
        .zip(&c.logprobs)
        .enumerate()
        .map(|(i, (&t, &l))| (t, l, c.top_logprobs.get(i).map(Vec::as_slice).unwrap_or(&[])))
        .collect()
}
