//! The run config's `[task]`, `[[reward]]` and `[eval]` sections: what is trained on, how a
//! completion is scored, and how the held-out set is measured. Every key optional (defaults
//! in the field docs); errors name the key (`task.path`, `reward[1].pattern`).

use serde::{Deserialize, Serialize};

use crate::error::bad;
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSection {
    /// "addition" (default: the built-in `a+b=` task, byte tokenizer) | "dataset"
    pub kind: String,
    /// addition: digits of the operands (default 1, 1..=4)
    pub digits: u32,
    /// dataset: the training records, `.jsonl` (one JSON object a line) or `.parquet`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// dataset: the held-out records (a second file); else `test_fraction` of `path` is held out
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_path: Option<String>,
    /// dataset without `test_path`: the share of `path` held out (seeded; default 0.1)
    pub test_fraction: f64,
    /// the record's prompt: a string field (default "prompt") ...
    pub prompt_field: String,
    /// ... or a list of `{role, content}` messages (set this to use it; default none)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_field: Option<String>,
    /// the record's reference answer (a string or a number; default "answer")
    pub answer_field: String,
    /// a per-record system prompt field (default none)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_field: Option<String>,
    /// one system prompt for every record (default none; `system_field` wins where set)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// render prompts through the tokenizer's chat template with its generation prompt
    /// (default false: the prompt text as is)
    pub chat: bool,
    /// visit the training records in a seeded random order, a new one every epoch (default true)
    pub shuffle: bool,
    /// passes over the training records; the run ends after them even if `steps` is not
    /// reached (default 0: no limit, `steps` decides)
    pub epochs: u64,
    /// count, report and skip records that fail to parse (default false: the first bad one is
    /// an error naming the file, line and field)
    pub skip_invalid: bool,
    /// strings that end a completion (besides the tokenizer's EOS tokens): text from the first
    /// one on is neither rewarded nor trained (default none; one that is a single token also
    /// stops generation)
    pub stop: Vec<String>,
    /// the warm-up's supervised completion, `{answer}` replaced by the record's answer
    /// (default "{answer}"; the first stop string or EOS token follows it)
    pub target: String,
    /// at most this many held-out records are evaluated (default 200)
    pub max_eval: usize,
}

impl Default for TaskSection {
    fn default() -> Self {
        Self {
            kind: "addition".into(),
            digits: 1,
            path: None,
            test_path: None,
            test_fraction: 0.1,
            prompt_field: "prompt".into(),
            messages_field: None,
            answer_field: "answer".into(),
            system_field: None,
            system: None,
            chat: false,
            shuffle: true,
            epochs: 0,
            skip_invalid: false,
            stop: Vec::new(),
            target: "{answer}".into(),
            max_eval: 200,
        }
    }
}

impl TaskSection {
    // `!(x >= 0.0)` on purpose: NaN fails
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        match self.kind.as_str() {
            "addition" => {
                if !(1..=4).contains(&self.digits) {
                    return Err(bad("task.digits", "must be 1..=4"));
                }
            }
            "dataset" => {
                if self.path.as_deref().is_none_or(str::is_empty) {
                    return Err(bad("task.path", "kind = \"dataset\" needs the training file (.jsonl or .parquet)"));
                }
                if self.test_path.is_none() && !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
                    return Err(bad("task.test_fraction", "must be in (0, 1) without task.test_path"));
                }
                if self.prompt_field.is_empty() && self.messages_field.is_none() {
                    return Err(bad("task.prompt_field", "must name a field (or set task.messages_field)"));
                }
                if self.answer_field.is_empty() {
                    return Err(bad("task.answer_field", "must name a field"));
                }
                if self.max_eval == 0 {
                    return Err(bad("task.max_eval", "must be > 0"));
                }
                if let Some(i) = self.stop.iter().position(String::is_empty) {
                    return Err(bad(&format!("task.stop[{i}]"), "an empty stop string ends every completion at once"));
                }
            }
            k => return Err(bad("task.kind", format!("`{k}`: expected addition or dataset (or implement Environment)"))),
        }
        Ok(())
    }
}

/// One `[[reward]]` table. The reward of a completion is Σ weight · reward over the tables.
/// Kinds (reward in [0, 1] unless said):
/// - `exact`: the completion (cut at a stop string, trimmed, case and inner whitespace
///   normalised) equals the answer;
/// - `math`: the final answer — the last `\boxed{..}`, else the last number — equals the
///   answer numerically within `tolerance` (relative, default 1e-6): `1,234`, `-3.5`, `3/4`,
///   `\frac{3}{4}` (`\dfrac`, `\tfrac`) and `$..$` are normalised;
/// - `regex`: `pattern` (a regex) must match; its first capture group (or the whole match)
///   must equal the answer (normalised as `exact`) — with `answer = false`, a match is enough;
/// - `format`: the whole completion must match `pattern` (anchored at both ends);
/// - `length`: a penalty, 0 up to `target` completion tokens, then −(n − target) / target,
///   at least −1;
/// - `http`: POST `{prompt, completion, answer, metadata}` to `url`, read `{reward, metrics?}`
///   (`timeout_s` default 10, `concurrency` default 8, `retries` default 2, `max_failures`
///   consecutive failed requests stop the run, default 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    pub kind: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u64>,
}

fn one() -> f64 {
    1.0
}

impl RewardSpec {
    /// A table of `kind` with weight 1 and no other key.
    pub fn of(kind: &str) -> Self {
        Self { kind: kind.into(), weight: 1.0, tolerance: None, pattern: None, answer: None, target: None, url: None, timeout_s: None, concurrency: None, retries: None, max_failures: None }
    }

    /// The keys set in this table other than `kind` and `weight`.
    fn set_keys(&self) -> Vec<&'static str> {
        let mut k = Vec::new();
        let mut add = |name, set: bool| {
            if set {
                k.push(name)
            }
        };
        add("tolerance", self.tolerance.is_some());
        add("pattern", self.pattern.is_some());
        add("answer", self.answer.is_some());
        add("target", self.target.is_some());
        add("url", self.url.is_some());
        add("timeout_s", self.timeout_s.is_some());
        add("concurrency", self.concurrency.is_some());
        add("retries", self.retries.is_some());
        add("max_failures", self.max_failures.is_some());
        k
    }
}

/// Check every `[[reward]]` table: a known kind, a finite weight, its keys and only its keys.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn validate_rewards(specs: &[RewardSpec]) -> Result<()> {
    for (i, r) in specs.iter().enumerate() {
        let key = |k: &str| format!("reward[{i}].{k}");
        let allowed: &[&str] = match r.kind.as_str() {
            "exact" => &[],
            "math" => &["tolerance"],
            "regex" => &["pattern", "answer"],
            "format" => &["pattern"],
            "length" => &["target"],
            "http" => &["url", "timeout_s", "concurrency", "retries", "max_failures"],
            k => return Err(bad(&key("kind"), format!("`{k}`: expected exact, math, regex, format, length or http"))),
        };
        if let Some(k) = r.set_keys().into_iter().find(|k| !allowed.contains(k)) {
            return Err(bad(&key(k), format!("does not apply to kind = \"{}\"", r.kind)));
        }
        if !r.weight.is_finite() {
            return Err(bad(&key("weight"), "must be finite"));
        }
        if let Some(t) = r.tolerance {
            if !(t >= 0.0 && t.is_finite()) {
                return Err(bad(&key("tolerance"), "must be a finite number >= 0"));
            }
        }
        if matches!(r.kind.as_str(), "regex" | "format") {
            let Some(p) = &r.pattern else { return Err(bad(&key("pattern"), format!("kind = \"{}\" needs a pattern", r.kind))) };
            if let Err(e) = regex::Regex::new(p) {
                return Err(bad(&key("pattern"), format!("not a regex: {e}")));
            }
        }
        if r.kind == "length" && r.target.is_none_or(|t| t == 0) {
            return Err(bad(&key("target"), "kind = \"length\" needs target > 0 (tokens)"));
        }
        if r.kind == "http" {
            match &r.url {
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => {}
                Some(u) => return Err(bad(&key("url"), format!("`{u}`: expected an http:// URL"))),
                None => return Err(bad(&key("url"), "kind = \"http\" needs a url")),
            }
            if let Some(t) = r.timeout_s {
                if !(t > 0.0 && t.is_finite()) {
                    return Err(bad(&key("timeout_s"), "must be > 0"));
                }
            }
            if r.concurrency == Some(0) {
                return Err(bad(&key("concurrency"), "must be > 0"));
            }
            if r.max_failures == Some(0) {
                return Err(bad(&key("max_failures"), "must be > 0"));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// evaluate every this many RL steps, and after the last (default 5)
    pub every: u64,
    /// pass@k on the held-out set, each k <= rollout.group_size: `group_size` samples per
    /// record at the rollout temperature, the unbiased estimator (default none)
    pub pass_k: Vec<usize>,
    /// a completion passes (eval accuracy, pass@k) when its reward is >= this (default 0.5)
    pub pass_threshold: f64,
    /// sample completions of the last eval shown in the report (default 8)
    pub samples: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self { every: 5, pass_k: Vec::new(), pass_threshold: 0.5, samples: 8 }
    }
}

impl EvalSection {
    pub fn validate(&self, group_size: usize) -> Result<()> {
        if self.every == 0 {
            return Err(bad("eval.every", "must be > 0"));
        }
        if let Some(&k) = self.pass_k.iter().find(|&&k| k == 0 || k > group_size) {
            return Err(bad("eval.pass_k", format!("{k}: each k must be in 1..=rollout.group_size ({group_size})")));
        }
        if !self.pass_threshold.is_finite() {
            return Err(bad("eval.pass_threshold", "must be finite"));
        }
        Ok(())
    }
}
