//! The `http` reward: a user's verifier behind a URL. Every completion is one
//! `POST url` with `{"prompt", "completion", "answer", "metadata"}`; the answer must be a JSON
//! object `{"reward": <finite number>, "metrics": {"name": <number>, ..}?}`. Requests run
//! `concurrency` at a time, each with a `timeout_s` limit and `retries` more tries (after
//! 0.1 s, 0.2 s, ..). A request that still fails scores 0 and counts in the `http_failures`
//! metric; `max_failures` failed requests in a row (across steps) stop the run with an error
//! naming the URL and the last failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::RewardSpec;
use crate::error::{Result, RlError};
use crate::reward_input::Input;

/// One completion's reward and metrics.
type Answer = (f32, BTreeMap<String, f64>);

pub struct HttpReward {
    pub url: String,
    agent: ureq::Agent,
    concurrency: usize,
    retries: u32,
    max_failures: u64,
    /// failed requests in a row (a success resets it)
    consecutive: AtomicU64,
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}

impl HttpReward {
    pub fn from_spec(s: &RewardSpec) -> Result<Self> {
        let url = s.url.clone().ok_or_else(|| crate::error::bad("reward.url", "kind = \"http\" needs a url"))?;
        let timeout = Duration::from_secs_f64(s.timeout_s.unwrap_or(10.0));
        let agent = ureq::AgentBuilder::new().timeout_connect(timeout).timeout(timeout).build();
        Ok(Self { url, agent, concurrency: s.concurrency.unwrap_or(8), retries: s.retries.unwrap_or(2), max_failures: s.max_failures.unwrap_or(5), consecutive: AtomicU64::new(0) })
    }

    /// One request, no retry: the reward and metrics, or what failed.
    fn once(&self, body: &Value) -> std::result::Result<Answer, String> {
        let resp = self.agent.post(&self.url).send_json(body.clone()).map_err(|e| match e {
            ureq::Error::Status(code, r) => format!("HTTP {code}: {}", snippet(&r.into_string().unwrap_or_default())),
            ureq::Error::Transport(t) => t.to_string(),
        })?;
        let text = resp.into_string().map_err(|e| format!("reading the answer: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("the answer is not JSON ({e}): {}", snippet(&text)))?;
        let reward = v.get("reward").and_then(Value::as_f64).ok_or_else(|| format!("`reward` missing or not a number: {}", snippet(&text)))?;
        if !reward.is_finite() {
            return Err(format!("`reward` is not finite: {}", snippet(&text)));
        }
        let mut metrics = BTreeMap::new();
        match v.get("metrics") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, x) in m {
                    let x = x.as_f64().filter(|x| x.is_finite()).ok_or_else(|| format!("`metrics.{k}` is not a finite number: {}", snippet(&text)))?;
                    metrics.insert(k.clone(), x);
                }
            }
            Some(_) => return Err(format!("`metrics` is not an object: {}", snippet(&text))),
        }
        Ok((reward as f32, metrics))
    }

    fn with_retries(&self, body: &Value) -> std::result::Result<Answer, String> {
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 << (attempt - 1).min(6)));
            }
            match self.once(body) {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(format!("{last} (after {} tries)", self.retries + 1))
    }

    /// Score a batch, `concurrency` requests at a time; results in input order.
    pub fn score(&self, items: &[Input]) -> Result<Vec<Answer>> {
        let bodies: Vec<Value> = items.iter().map(|x| json!({"prompt": x.prompt, "completion": x.completion, "answer": x.answer, "metadata": x.metadata})).collect();
        let lanes = self.concurrency.min(bodies.len()).max(1);
        let mut results: Vec<Option<std::result::Result<Answer, String>>> = vec![None; bodies.len()];
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let bodies = &bodies;
                    s.spawn(move || (lane..bodies.len()).step_by(lanes).map(|i| (i, self.with_retries(&bodies[i]))).collect::<Vec<_>>())
                })
                .collect();
            for h in handles {
                for (i, r) in h.join().unwrap_or_default() {
                    results[i] = Some(r);
                }
            }
        });
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r.unwrap_or_else(|| Err("a request thread panicked".into())) {
                Ok((v, m)) => {
                    self.consecutive.store(0, Ordering::SeqCst);
                    out.push((v, m));
                }
                Err(e) => {
                    let n = self.consecutive.fetch_add(1, Ordering::SeqCst) + 1;
                    if n >= self.max_failures {
                        return Err(RlError::Reward { url: self.url.clone(), msg: format!("{n} requests in a row failed (max_failures = {}); the last: {e}", self.max_failures) });
                    }
                    out.push((0.0, BTreeMap::from([("http_failures".to_string(), 1.0)])));
                }
            }
        }
        Ok(out)
    }
}
