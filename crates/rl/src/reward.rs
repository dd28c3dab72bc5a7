//! Reward functions over text (`[[reward]]` in the run config, composed with weights): `exact`,
//! `math`, `regex`, `format`, `length` and `http` (`crate::http_reward`). The completion they
//! see is the decoded text cut at the first stop string; a malformed completion (no number, an
//! unclosed `\boxed{`, a division by zero) scores 0, never an error.
//!
//! ```text
//! answer "1234"  completion "... so the total is \boxed{1,234}."      math  → 1
//! answer "0.75"  completion "It is \frac{3}{4}"                        math  → 1
//! answer "7"     completion "Answer: 7"  regex "Answer: (\d+)"          regex → 1
//! completion "<think>..</think> 7"  format "<think>.*</think>\s*\d+"    format → 1
//! ```

use std::collections::BTreeMap;

use regex::Regex;

use crate::config::RewardSpec;
use crate::error::Result;
use crate::http_reward::HttpReward;

pub use crate::reward_input::Input;

/// A completion's score: the weighted sum, each table's own reward, and metrics an `http`
/// reward returned (or `http_failures`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scored {
    pub reward: f32,
    pub parts: Vec<f32>,
    pub metrics: BTreeMap<String, f64>,
}

enum Kind {
    Exact,
    Math { tolerance: f64 },
    Regex { re: Regex, compare: bool },
    Format { re: Regex },
    Length { target: usize },
    Http(Box<HttpReward>),
}

struct Part {
    weight: f64,
    kind: Kind,
}

/// The `[[reward]]` tables of a run, built once.
pub struct RewardSet {
    parts: Vec<Part>,
    /// one name per table: its kind, `kind#i` when a kind appears twice
    pub names: Vec<String>,
}

fn compile(pattern: &str, key: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| crate::error::bad(key, format!("not a regex: {e}")))
}

impl RewardSet {
    /// From validated specs ([`crate::task_config::validate_rewards`]).
    pub fn new(specs: &[RewardSpec]) -> Result<Self> {
        let mut parts = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let key = format!("reward[{i}].pattern");
            let kind = match s.kind.as_str() {
                "exact" => Kind::Exact,
                "math" => Kind::Math { tolerance: s.tolerance.unwrap_or(1e-6) },
                "regex" => Kind::Regex { re: compile(s.pattern.as_deref().unwrap_or(""), &key)?, compare: s.answer.unwrap_or(true) },
                "format" => Kind::Format { re: compile(&format!("^(?:{})$", s.pattern.as_deref().unwrap_or("")), &key)? },
                "length" => Kind::Length { target: s.target.unwrap_or(1).max(1) },
                "http" => Kind::Http(Box::new(HttpReward::from_spec(s)?)),
                k => return Err(crate::error::bad(&format!("reward[{i}].kind"), format!("`{k}`: unknown"))),
            };
            parts.push(Part { weight: s.weight, kind });
        }
        let names = specs
            .iter()
            .enumerate()
            .map(|(i, s)| if specs.iter().filter(|o| o.kind == s.kind).count() > 1 { format!("{}#{i}", s.kind) } else { s.kind.clone() })
            .collect();
        Ok(Self { parts, names })
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Score a batch (the `http` tables send theirs concurrently). Errors only for a run-stopping
    /// failure (an `http` reward's `max_failures` in a row).
    pub fn score(&self, items: &[Input]) -> Result<Vec<Scored>> {
        let mut out: Vec<Scored> = vec![Scored::default(); items.len()];
        for p in &self.parts {
            let values: Vec<(f32, BTreeMap<String, f64>)> = match &p.kind {
                Kind::Http(h) => h.score(items)?,
                k => items.iter().map(|x| (local(k, x), BTreeMap::new())).collect(),
            };
            for (o, (v, m)) in out.iter_mut().zip(values) {
                o.reward += (p.weight * f64::from(v)) as f32;
                o.parts.push(v);
                for (k, x) in m {
                    *o.metrics.entry(k).or_default() += x;
                }
            }
        }
        Ok(out)
    }
}

fn local(kind: &Kind, x: &Input) -> f32 {
    let b = |c: bool| f32::from(u8::from(c));
    match kind {
        Kind::Exact => b(normalise(x.completion) == normalise(x.answer)),
        Kind::Math { tolerance } => b(math_equal(x.completion, x.answer, *tolerance)),
        Kind::Regex { re, compare } => match re.captures(x.completion) {
            None => 0.0,
            Some(c) => {
                let got = c.get(1).or_else(|| c.get(0)).map_or("", |m| m.as_str());
                b(!compare || normalise(got) == normalise(x.answer))
            }
        },
        Kind::Format { re } => b(re.is_match(x.completion)),
        Kind::Length { target } => {
            let over = x.tokens.saturating_sub(*target) as f32 / *target as f32;
            -over.min(1.0)
        }
        Kind::Http(_) => unreachable!("http rewards are scored in batches"),
    }
}

/// Trimmed, lower-cased, inner whitespace collapsed to one space.
pub fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Lower-cased with every space removed (`x + 1` = `x+1`), for answers that are no number.
fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase()
}

/// The content of the last `\boxed{..}` (braces balanced; `None` when there is none or it is
/// not closed).
pub fn last_boxed(s: &str) -> Option<&str> {
    let start = s.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in s[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

fn number_re() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|-?\d+(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+").expect("a valid regex")
    })
}

/// The final answer of a completion: the last `\boxed{..}`, else the last number (a
/// `\frac{a}{b}`, `a/b`, `1,234`, `-3.5`).
pub fn final_answer(s: &str) -> Option<&str> {
    if s.contains("\\boxed{") {
        return last_boxed(s);
    }
    number_re().find_iter(s).last().map(|m| m.as_str())
}

/// A number from text: commas (thousands), `$`, spaces, `\!`, `\left` / `\right` and a
/// trailing `.` dropped; `\frac{a}{b}`, `\dfrac`, `\tfrac`, `a/b` divided; `None` when it is no
/// finite number.
pub fn parse_number(s: &str) -> Option<f64> {
    let mut t: String = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace(['$', ',', ' '], "");
    while t.ends_with('.') {
        t.pop();
    }
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.as_str()),
    };
    for p in ["\\dfrac", "\\tfrac", "\\frac"] {
        if let Some(rest) = body.strip_prefix(p) {
            let (a, rest) = rest.strip_prefix('{')?.split_once('}')?;
            let b = rest.strip_prefix('{')?.strip_suffix('}')?;
            let v = parse_number(a)? / parse_number(b)?;
            return Some(if neg { -v } else { v }).filter(|v| v.is_finite());
        }
    }
    if let Some((a, b)) = t.split_once('/') {
        let v = parse_number(a)? / parse_number(b)?;
        return Some(v).filter(|v| v.is_finite());
    }
    t.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `math`: the completion's final answer equals the answer within `tolerance` (relative to
/// max(1, |answer|)); an answer that is no number is compared as text, spaces and case aside.
pub fn math_equal(completion: &str, answer: &str, tolerance: f64) -> bool {
    let Some(got) = final_answer(completion) else { return false };
    match (parse_number(answer), parse_number(got)) {
        (Some(a), Some(g)) => (a - g).abs() <= tolerance * a.abs().max(1.0),
        (None, _) => squash(got) == squash(answer),
        (Some(_), None) => false,
    }
}
