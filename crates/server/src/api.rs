//! Wire types of the OpenAI-compatible API as current vLLM speaks it
//! (`vllm/entrypoints/openai/completion/protocol.py`, `chat_completion/protocol.py`), with
//! lockstep's extensions: `top_k`, `stop_token_ids`, `ignore_eos`, `return_routed_experts`,
//! `routed_experts_prompt_start` (vLLM) / `routed_experts_start_len` (SGLang) /
//! `routes_prompt_start`, `routed_experts_format`, `return_router_probs`,
//! `return_tokens_as_token_ids` in requests; `prompt_token_ids` (on the completions choice, at
//! the top of a chat response, as vLLM), `token_ids`, `routed_experts` (vLLM's base64 `.npy`,
//! or lockstep's nested lists on request), `routes` (a base64 `.lstrace` file), `routes_start`,
//! `policy_version` in every choice.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// `prompt`: text, token ids, or a list of either (one choice set per prompt).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A content part of a chat message (`{"type": "text", "text": ...}`).
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

/// One body type for `/v1/completions` and `/v1/chat/completions`; each endpoint checks the
/// fields that belong to the other (`messages` / `prompt`) are absent. Unknown fields are
/// ignored; known OpenAI fields lockstep does not implement are refused when set.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenRequest {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// extension: keep the k most likely tokens (0 or -1 = all)
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub n: Option<u32>,
    pub stop: Option<Stop>,
    /// extension
    pub stop_token_ids: Option<Vec<u32>>,
    /// extension (vLLM): do not stop at the tokenizer's end-of-sequence tokens
    pub ignore_eos: Option<bool>,
    /// completions: top-n count (integer); chat: whether to return log-probabilities (bool)
    pub logprobs: Option<Value>,
    /// chat: top-n count
    pub top_logprobs: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// `routed_experts` in every choice (default true, as a vLLM server started with
    /// `--enable-return-routed-experts`; SGLang's request flag)
    pub return_routed_experts: Option<bool>,
    /// `vllm` (default): base64 `.npy`, `(N - 1 - start, num_hidden_layers, top_k)`, as current
    /// vLLM; `lockstep`: nested lists of every token from `start`, MoE layers only, with
    /// `moe_layers` (and `router_probs` with `return_router_probs`)
    pub routed_experts_format: Option<String>,
    /// vLLM: route rows from this prompt token on
    pub routed_experts_prompt_start: Option<usize>,
    /// SGLang: route rows from this prompt token on
    pub routed_experts_start_len: Option<usize>,
    /// vLLM: log-probability tokens as `token_id:{id}`
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM: token ids in the choices (lockstep always returns them)
    pub return_token_ids: Option<bool>,
    /// extension: router probabilities in the route trace (and as nested lists with
    /// `return_routed_experts`)
    pub return_router_probs: Option<bool>,
    /// extension: return route rows from this token index on (a multi-turn client already
    /// holds the prefix's); at most the prompt length
    pub routes_prompt_start: Option<usize>,
    /// chat extension: end the prompt with the assistant header (default true)
    pub add_generation_prompt: Option<bool>,
    /// chat extension: extra variables for the chat template
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    // OpenAI fields lockstep does not implement: refused unless at their no-op value
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub tools: Option<Vec<Value>>,
    /// vLLM / OpenAI fields lockstep does not implement: refused (400 naming the field) unless
    /// absent, null or their no-op value ([`crate::generate::UNSUPPORTED`])
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub logits_processors: Option<Value>,
    pub prompt_embeds: Option<Value>,
    pub use_beam_search: Option<Value>,
    pub min_tokens: Option<Value>,
    pub repetition_penalty: Option<Value>,
    pub min_p: Option<Value>,
    pub bad_words: Option<Value>,
    pub allowed_token_ids: Option<Value>,
    pub prompt_logprobs: Option<Value>,
    pub logprob_token_ids: Option<Value>,
    pub include_stop_str_in_output: Option<Value>,
    pub continue_final_message: Option<Value>,
    pub tool_choice: Option<Value>,
    pub truncate_prompt_tokens: Option<Value>,
}

/// Deepest nesting of arrays / objects a body may have (serde_json holds the fields it reads to
/// 128 levels, but skips unknown ones without a bound).
pub const MAX_JSON_DEPTH: usize = 128;

/// Whether no array / object in `body` nests deeper than [`MAX_JSON_DEPTH`] (strings skipped).
fn depth_ok(body: &[u8]) -> bool {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &b in body {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Parse a JSON body, naming the field at fault (`max_tokens: invalid type: string ...`).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if !depth_ok(body) {
        return Err(ApiError::invalid("", format!("malformed JSON body: nested deeper than {MAX_JSON_DEPTH} levels")));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid("", format!("malformed JSON body: {msg}"));
        }
        let field = match msg.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
            Some(f) if path == "." => f.to_string(),
            _ => path.split(['.', '[']).next().unwrap_or("").to_string(),
        };
        if field.is_empty() {
            ApiError::invalid("", format!("the body must be a JSON object: {msg}"))
        } else {
            ApiError::invalid(&field, format!("{msg} (at {path})"))
        }
    })?;
    de.end().map_err(|e| ApiError::invalid("", format!("malformed JSON body: {e}")))?;
    Ok(v)
}

impl GenRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        parse_json(body)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadWeightsRequest {
    pub path: String,
    /// the policy version stamped into routes from now on (default: current + 1)
    pub version: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Legacy completions log-probabilities.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
    /// extension: the token id
    pub token_id: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// lockstep's per-choice extension fields (on the final chunk when streaming).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteFields {
    /// on the completions choice (a chat response has it at the top, as vLLM)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    pub token_ids: Vec<u32>,
    /// base64 of a `.lstrace` file holding this sequence's routes (rows `routes_start..`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<String>,
    pub routes_start: usize,
    pub policy_version: u64,
    /// vLLM's base64 `.npy` string, or lockstep's nested lists (`routed_experts_format`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_experts: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_probs: Option<Vec<Vec<Vec<f32>>>>,
    /// decoder-layer index of each column of `routed_experts` / `router_probs`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub ext: Option<RouteFields>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub ext: Option<RouteFields>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub ext: Option<RouteFields>,
}

/// A response or stream chunk: `object` tells which (`text_completion`, `chat.completion`,
/// `chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response<C> {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// chat: the prompt's token ids (vLLM puts them here; on the first chunk of a stream)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}
