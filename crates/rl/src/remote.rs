//! Rollouts against lockstep servers by URL (the OpenAI-compatible `/v1/completions` with
//! lockstep's extensions: token-id prompts, `stop_token_ids`, `return_router_probs`, routes as a
//! base64 `.lstrace`), and weight sync through `/v1/load_weights`. Requests go to the servers
//! round-robin, several in flight per server so each server batches them.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use lockstep_engine::{Completion, FinishReason, Request};
use serde_json::{json, Value};

use crate::error::{Result, RlError};

/// In-flight requests per server.
const PER_SERVER: usize = 16;
/// Connecting to a server (a host that drops packets fails after this).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole of one `GET /health` (a server that accepts but does not answer).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RemoteEngine {
    pub urls: Vec<String>,
    agent: ureq::Agent,
    /// `LOCKSTEP_API_KEY` / `LOCKSTEP_ADMIN_KEY`, read once: the Bearer tokens a secured
    /// `lockstep serve` asks for (completions / load_weights)
    api_key: Option<String>,
    admin_key: Option<String>,
}

fn env_key(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|k| !k.is_empty())
}

fn err(url: &str, msg: impl ToString) -> RlError {
    RlError::Io { path: url.to_string(), msg: msg.to_string() }
}

impl RemoteEngine {
    pub fn new(urls: Vec<String>) -> Self {
        Self::with_timeouts(urls, CONNECT_TIMEOUT, Duration::from_secs(600))
    }

    /// `connect`: to open a connection; `request`: the whole of one request (generation can be
    /// slow).
    pub fn with_timeouts(urls: Vec<String>, connect: Duration, request: Duration) -> Self {
        let agent = ureq::AgentBuilder::new().timeout_connect(connect).timeout(request).build();
        Self {
            urls: urls.into_iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
            agent,
            api_key: env_key("LOCKSTEP_API_KEY"),
            admin_key: env_key("LOCKSTEP_ADMIN_KEY"),
        }
    }

    /// `GET /health` on every server: each must answer a lockstep server's `{"status": "ok"}`.
    /// Errors name the URL and what failed (connection refused, timeout, HTTP status, body).
    pub fn check(&self) -> Result<()> {
        self.check_within(HEALTH_TIMEOUT)
    }

    /// [`RemoteEngine::check`] with its own time limit per server.
    pub fn check_within(&self, limit: Duration) -> Result<()> {
        for u in &self.urls {
            let url = format!("{u}/health");
            let resp = self.agent.get(&url).timeout(limit).call().map_err(|e| {
                let what = if matches!(e, ureq::Error::Status(..)) { "rollout server failed" } else { "rollout server unreachable" };
                err(&url, format!("{what}: {}", describe(e)))
            })?;
            let text = resp.into_string().map_err(|e| err(&url, format!("reading the answer: {e}")))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| err(&url, format!("not a lockstep server: the answer is not JSON ({e}): {}", snippet(&text))))?;
            if v.get("status").and_then(Value::as_str) != Some("ok") {
                return Err(err(&url, format!("not a lockstep server: expected {{\"status\": \"ok\"}}, got {}", snippet(&text))));
            }
        }
        Ok(())
    }

    /// Ask every server to load a checkpoint directory (drains, swaps, bumps the version).
    pub fn load_weights(&self, dir: &Path) -> Result<u64> {
        let path = std::fs::canonicalize(dir).map_err(|e| RlError::io(dir, e))?;
        let mut version = None;
        for u in &self.urls {
            let url = format!("{u}/v1/load_weights");
            let mut req = self.agent.post(&url);
            if let Some(k) = &self.admin_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            // no version: the server stamps current + 1 (strictly increasing) and says which
            let text = req
                .send_json(json!({"path": path.display().to_string()}))
                .map_err(|e| err(&url, describe(e)))?
                .into_string()
                .map_err(|e| err(&url, format!("reading the answer: {e}")))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| err(&url, format!("the answer is not JSON ({e}): {}", snippet(&text))))?;
            let got = v.get("policy_version").and_then(Value::as_u64).ok_or_else(|| err(&url, format!("policy_version missing: {}", snippet(&text))))?;
            version.get_or_insert(got);
        }
        Ok(version.unwrap_or(0))
    }

    /// Generate every request; completions in request order.
    pub fn generate(&self, reqs: &[Request]) -> Result<Vec<Completion>> {
        let lanes = self.urls.len() * PER_SERVER;
        let mut out: Vec<Option<Completion>> = vec![None; reqs.len()];
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let url = &self.urls[lane % self.urls.len()];
                    s.spawn(move || -> Result<Vec<(usize, Completion)>> {
                        (lane..reqs.len()).step_by(lanes).map(|i| Ok((i, self.one(url, &reqs[i], i as u64)?))).collect()
                    })
                })
                .collect();
            for h in handles {
                for (i, c) in h.join().map_err(|_| err("rollout", "a request thread panicked"))?? {
                    out[i] = Some(c);
                }
            }
            Ok(())
        })?;
        Ok(out.into_iter().map(|c| c.expect("every request answered")).collect())
    }

    fn one(&self, base: &str, r: &Request, id: u64) -> Result<Completion> {
        let url = format!("{base}/v1/completions");
        let body = json!({
            "prompt": r.prompt,
            "max_tokens": r.params.max_tokens,
            "temperature": r.params.temperature,
            "top_p": r.params.top_p,
            "top_k": r.params.top_k,
            "seed": r.params.seed,
            "stop_token_ids": r.params.stop_token_ids,
            "logprobs": 0,
            "return_router_probs": true,
        });
        let mut req = self.agent.post(&url);
        if let Some(k) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let text = req.send_json(body).map_err(|e| err(&url, describe(e)))?.into_string().map_err(|e| err(&url, format!("reading the answer: {e}")))?;
        let resp: Value = serde_json::from_str(&text).map_err(|e| err(&url, format!("the answer is not JSON ({e}): {}", snippet(&text))))?;
        let choice = resp.pointer("/choices/0").ok_or_else(|| err(&url, "response without choices[0]"))?;
        let ids = |key: &str| -> Result<Vec<u32>> {
            serde_json::from_value(choice.get(key).cloned().unwrap_or(Value::Null)).map_err(|e| err(&url, format!("choices[0].{key}: {e}")))
        };
        let prompt = ids("prompt_token_ids")?;
        let tokens = ids("token_ids")?;
        let logprobs: Vec<f32> = serde_json::from_value(choice.pointer("/logprobs/token_logprobs").cloned().unwrap_or(Value::Null))
            .map_err(|e| err(&url, format!("choices[0].logprobs.token_logprobs: {e}")))?;
        if logprobs.len() != tokens.len() {
            return Err(err(&url, format!("{} logprobs for {} tokens", logprobs.len(), tokens.len())));
        }
        let b64 = choice.get("routes").and_then(Value::as_str).ok_or_else(|| err(&url, "choices[0].routes missing (capture off?)"))?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| err(&url, format!("choices[0].routes: {e}")))?;
        let trace = lockstep_trace::Reader::from_bytes(bytes)?.get(0)?;
        let n = prompt.len() + tokens.len();
        if trace.num_tokens() != n {
            return Err(err(&url, format!("routes hold {} rows for {n} tokens", trace.num_tokens())));
        }
        if trace.top_k().is_none() {
            return Err(err(&url, "variable-count routes"));
        }
        if let Some(t) = (0..n).find(|&t| trace.is_missing(t)) {
            return Err(err(&url, format!("routes: token {t} missing")));
        }
        if trace.probs().is_none() {
            return Err(err(&url, "routes without router probabilities"));
        }
        let finish = match choice.get("finish_reason").and_then(Value::as_str) {
            Some("stop") => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        Ok(Completion {
            id,
            prompt,
            tokens,
            logprobs,
            routes: Some(trace),
            top_logprobs: Vec::new(),
            finish,
            policy_version: choice.get("policy_version").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// What failed, without the URL (the caller names it): `HTTP 500: <body>`, `connection
/// refused`, `timed out`, ...
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => format!("HTTP {code}: {}", snippet(&r.into_string().unwrap_or_default())),
        ureq::Error::Transport(t) => {
            let mut msg = t.kind().to_string();
            if let Some(m) = t.message() {
                msg = format!("{msg}: {m}");
            }
            // the io error underneath says refused / timed out / reset
            let mut src = std::error::Error::source(&t);
            let mut last = None;
            while let Some(s) = src {
                last = Some(s.to_string());
                src = s.source();
            }
            match last {
                Some(l) if !msg.contains(&l) => format!("{msg}: {l}"),
                _ => msg,
            }
        }
    }
}

/// The start of an answer body, for error messages.
fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None if t.is_empty() => "(empty body)".into(),
        None => t.to_string(),
    }
}
