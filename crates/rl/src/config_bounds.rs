//! Numeric sanity of a run config, checked before anything else of it: every float finite and
//! in a range that means something, sizes with upper bounds, names not empty. Each error names
//! its key (`trainer.lr`, `loss.clip_high`, ...).

use crate::config::RunConfig;
use crate::error::{bad, Result};

/// `x` finite and in [lo, hi].
fn within(key: &str, x: f64, lo: f64, hi: f64) -> Result<()> {
    if x.is_finite() && (lo..=hi).contains(&x) {
        Ok(())
    } else {
        Err(bad(key, format!("{x}: must be a finite number in [{lo:e}, {hi:e}]")))
    }
}

fn not_empty(key: &str, s: Option<&str>) -> Result<()> {
    match s {
        Some(v) if v.trim().is_empty() => Err(bad(key, "must not be empty")),
        _ => Ok(()),
    }
}

/// `http(s)://host...` with a non-empty host.
fn has_host(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    !rest.split(['/', '?', '#']).next().unwrap_or("").trim_start_matches('@').is_empty()
}

/// Most tokens one completion may ask for: the engine's longest context.
pub const MAX_COMPLETION_TOKENS: usize = 1 << 20;

impl RunConfig {
    /// See the [module doc](self).
    pub(crate) fn check_bounds(&self) -> Result<()> {
        let t = &self.trainer;
        // a huge (finite) rate is the non-finite guard's own test case (rl/tests/guards.rs)
        within("trainer.lr", t.lr, 0.0, 1e30)?;
        within("trainer.weight_decay", t.weight_decay, 0.0, 10.0)?;
        within("trainer.max_grad_norm", t.max_grad_norm, 0.0, 1e9)?;
        within("warmup.lr", self.warmup.lr, 0.0, 1e30)?;
        let r = &self.rollout;
        within("rollout.temperature", f64::from(r.temperature), 0.0, 100.0)?;
        if r.max_tokens > MAX_COMPLETION_TOKENS {
            return Err(bad("rollout.max_tokens", format!("{}: at most {MAX_COMPLETION_TOKENS}", r.max_tokens)));
        }
        let l = &self.loss;
        for (key, x, hi) in [
            ("loss.clip_low", l.clip_low, 1.0),
            ("loss.clip_high", l.clip_high, 1e6),
            ("loss.tis_cap", l.tis_cap, 1e12),
            ("loss.mis_low", l.mis_low, 1e12),
            ("loss.mis_high", l.mis_high, 1e12),
            ("loss.router_shift_floor", l.router_shift_floor, 1.0),
            ("loss.extreme_tau", l.extreme_tau, 1e12),
            ("loss.kl_coef", l.kl_coef, 1e6),
            ("loss.entropy_coef", l.entropy_coef.abs(), 1e6),
        ] {
            within(key, x, 0.0, hi)?;
        }
        within("eval.pass_threshold", self.eval.pass_threshold, -1e12, 1e12)?;
        not_empty("model.checkpoint", self.model.checkpoint.as_deref())?;
        not_empty("task.test_path", self.task.test_path.as_deref())?;
        not_empty("task.messages_field", self.task.messages_field.as_deref())?;
        let mut seen = std::collections::BTreeSet::new();
        // ServerSpec::parse refuses a URL without a host
        for (i, spec) in self.rollout.server_specs()?.iter().enumerate() {
            if !seen.insert(spec.url.clone()) {
                return Err(bad(&format!("rollout.servers[{i}]"), format!("`{}` is listed twice", spec.url)));
            }
        }
        for (i, r) in self.reward.iter().enumerate() {
            within(&format!("reward[{i}].weight"), r.weight, -1e6, 1e6)?;
            if let Some(u) = &r.url {
                if !has_host(u) {
                    return Err(bad(&format!("reward[{i}].url"), format!("`{u}`: no host")));
                }
            }
            if r.retries.is_some_and(|n| n > 100) {
                return Err(bad(&format!("reward[{i}].retries"), "at most 100"));
            }
            if r.concurrency.is_some_and(|n| n > 4096) {
                return Err(bad(&format!("reward[{i}].concurrency"), "at most 4096"));
            }
        }
        if !self.reward.is_empty() && self.reward.iter().all(|r| r.weight == 0.0) {
            return Err(bad("reward[0].weight", "every reward has weight 0: nothing would be learned"));
        }
        Ok(())
    }
}
