//! What a run keeps between its steps and across a resume: run_state.json (written inside the
//! atomic checkpoint, range-checked on resume, stamped with the config's fingerprint), the
//! frozen KL reference's place, and the guard that stops a run after
//! `trainer.max_nonfinite_steps` skipped updates in a row.
//!
//! **Config fingerprint.** run_state.json holds `config`, the keys of the run's config that
//! shape its trajectory (dotted names → their TOML values), and `config_fingerprint`, the
//! SHA-256 of them. A resume whose config differs in any of them is refused, naming the keys,
//! unless the config sets `allow_config_change = true`. Every key counts except those that
//! leave the trajectory alone ([`NOT_FINGERPRINTED`]): `steps` (extending a run is a resume),
//! `allow_config_change`, `[eval]` (evaluation reads the weights only), `[output]`,
//! `model.checkpoint` (a resume's weights are the checkpoint's), `rollout.servers` (addresses),
//! `trainer.max_nonfinite_steps` (a guard) and the bitwise-neutral memory knobs
//! `trainer.activation_checkpointing` / `trainer.logits_chunk_tokens`, and
//! `trainer.shard_optimizer` (only the order of the gradient-norm sum, like the rank count). `replay.enabled` is the
//! run's effective replay (`--compare-replay` arms override it). A run_state.json without a
//! fingerprint (written before it existed) resumes unchecked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lockstep_trainer::trainer::Trainer;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Result, RlError};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct RunState {
    pub rl_step: u64,
    pub warmup_eval: f64,
    /// Set in a checkpoint taken during the warm-up: warm-up steps done (the trainer and its
    /// optimizer state are the warm-up's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_step: Option<u64>,
}

/// Config keys (dotted; a key names itself and everything under it) left out of the
/// fingerprint: they do not change what the run computes (module doc).
pub const NOT_FINGERPRINTED: &[&str] = &[
    "steps",
    "allow_config_change",
    "eval",
    "output",
    "model.checkpoint",
    "rollout.servers",
    "trainer.max_nonfinite_steps",
    "trainer.activation_checkpointing",
    "trainer.logits_chunk_tokens",
    "trainer.shard_optimizer",
];

/// The trajectory keys of a run's config and their fingerprint, as run_state.json stores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStamp {
    pub config_fingerprint: String,
    pub config: BTreeMap<String, String>,
}

impl ConfigStamp {
    /// The stamp of `cfg` run with replay `replay`.
    pub fn of(cfg: &RunConfig, replay: bool) -> Self {
        let mut c = cfg.clone();
        c.replay.enabled = replay;
        let mut config = BTreeMap::new();
        // a RunConfig always serialises (its fields are plain data)
        flatten(&serde_json::to_value(&c).unwrap_or_default(), String::new(), &mut config);
        let text: String = config.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        Self { config_fingerprint: lockstep_model::manifest::sha256_hex(text.as_bytes()), config }
    }

    /// The keys whose values differ between `self` (the checkpoint's) and `now`, with both
    /// values (`<absent>` where a side lacks the key).
    pub fn differences(&self, now: &ConfigStamp) -> Vec<(String, String, String)> {
        let absent = || "<absent>".to_string();
        let keys: std::collections::BTreeSet<&String> = self.config.keys().chain(now.config.keys()).collect();
        keys.into_iter()
            .filter_map(|k| {
                let (a, b) = (self.config.get(k), now.config.get(k));
                (a != b).then(|| (k.clone(), a.cloned().unwrap_or_else(absent), b.cloned().unwrap_or_else(absent)))
            })
            .collect()
    }
}

fn excluded(key: &str) -> bool {
    NOT_FINGERPRINTED.iter().any(|x| key == *x || key.strip_prefix(x).is_some_and(|r| r.starts_with('.')))
}

/// Dotted keys → JSON text of the leaves (arrays by index: `reward.0.kind`), excluded keys left out.
fn flatten(v: &serde_json::Value, at: String, out: &mut BTreeMap<String, String>) {
    if !at.is_empty() && excluded(&at) {
        return;
    }
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| flatten(x, join(k), out)),
        serde_json::Value::Array(a) if !a.is_empty() => a.iter().enumerate().for_each(|(i, x)| flatten(x, join(&i.to_string()), out)),
        leaf => {
            out.insert(at, leaf.to_string());
        }
    }
}

/// What run_state.json holds: the state and the config stamp.
#[derive(Serialize, Deserialize)]
struct RunStateFile {
    #[serde(flatten)]
    state: RunState,
    #[serde(flatten)]
    stamp: Option<ConfigStamp>,
}

/// The frozen reference of the KL penalty: the model after the warm-up, kept under
/// `<out>/reference` so that a resumed run penalises against the same weights.
pub(crate) fn reference_dir(out: &Path) -> PathBuf {
    out.join("reference")
}

/// Trainer checkpoint + run_state.json, written as one atomic directory (every rank calls it;
/// rank 0 writes): run_state.json goes into the temporary directory with the weights and
/// optimizer state before the rename, so a checkpoint directory always has it.
pub(crate) fn save_checkpoint(trainer: &Trainer, dir: &Path, st: &RunState, stamp: &ConfigStamp) -> Result<()> {
    let file = RunStateFile { state: *st, stamp: Some(stamp.clone()) };
    let text = serde_json::to_string_pretty(&file).map_err(|e| RlError::io(dir, e))?;
    trainer.save_with(dir, &[("run_state.json", text.into_bytes())])?;
    Ok(())
}

/// Read `<dir>/run_state.json` and check it against the config: `rl_step <= steps`,
/// `warmup_step < warmup.steps`, the config fingerprint equal to `stamp`'s unless
/// `allow_config_change` (errors name the field and the file).
pub(crate) fn read_run_state(dir: &Path, cfg: &RunConfig, stamp: &ConfigStamp) -> Result<RunState> {
    let st_path = dir.join("run_state.json");
    let text = std::fs::read_to_string(&st_path).map_err(|e| RlError::io(&st_path, e))?;
    let file = serde_json::from_str::<RunStateFile>(&text).map_err(|e| RlError::io(&st_path, e))?;
    let st = file.state;
    if let Some(saved) = &file.stamp {
        check_stamp(&st_path, saved, stamp, cfg.allow_config_change)?;
    }
    if st.rl_step > cfg.steps {
        return Err(RlError::io(&st_path, format!("`rl_step` = {}: beyond the config's steps = {}", st.rl_step, cfg.steps)));
    }
    if let Some(w) = st.warmup_step {
        if w >= cfg.warmup.steps {
            return Err(RlError::io(&st_path, format!("`warmup_step` = {w}: must be < the config's warmup.steps = {}", cfg.warmup.steps)));
        }
        if st.rl_step != 0 {
            return Err(RlError::io(&st_path, format!("`rl_step` = {}: a warm-up checkpoint (`warmup_step` set) has rl_step 0", st.rl_step)));
        }
        if w.checked_mul(cfg.warmup.batch as u64).is_none() {
            return Err(RlError::io(&st_path, format!("`warmup_step` = {w}: times warmup.batch overflows")));
        }
    }
    if !st.warmup_eval.is_finite() {
        return Err(RlError::io(&st_path, "`warmup_eval`: not a finite number"));
    }
    Ok(st)
}

/// At the start of a run: the stamp of its config (`replay`: the effective replay) and, on the
/// writing rank, what interrupted saves left in `<out>`, `<out>/checkpoints` and beside the checkpoint
/// to resume removed (`.<name>.tmp-<pid>`; a displaced `.<name>.old-<pid>` moved back when
/// `<name>` is missing, else removed).
pub(crate) fn start_checkpoints(cfg: &RunConfig, replay: bool, out: &Path, resume: Option<&Path>, writes: bool) -> Result<ConfigStamp> {
    if writes {
        // `<out>` holds `reference` and `weights-sync`, `<out>/checkpoints` the checkpoints
        lockstep_model::manifest::clean_stale_in(out)?;
        lockstep_model::manifest::clean_stale_in(&out.join("checkpoints"))?;
        if let Some(dir) = resume {
            lockstep_model::manifest::clean_stale_siblings(dir)?;
        }
    }
    Ok(ConfigStamp::of(cfg, replay))
}

/// After warm-up step `done`: every `output.checkpoint_every` steps but the last (the RL steps'
/// checkpoints follow it), and not while updates are being skipped, write
/// `<out>/checkpoints/warmup-<done>` (`warmup_step` = done), which `--resume` continues
/// mid-warm-up. Every rank calls it (the save is a collective).
pub(crate) fn periodic_warmup_checkpoint(t: &Trainer, done: u64, cfg: &RunConfig, guard: &mut NonFiniteGuard, (out, stamp): (&Path, &ConfigStamp)) -> Result<()> {
    let every = cfg.output.checkpoint_every;
    if every == 0 || done % every != 0 || done >= cfg.warmup.steps || guard.consecutive > 0 {
        return Ok(());
    }
    let dir = out.join("checkpoints").join(format!("warmup-{done}"));
    save_checkpoint(t, &dir, &RunState { rl_step: 0, warmup_eval: 0.0, warmup_step: Some(done) }, stamp)?;
    guard.last_checkpoint = Some(dir);
    Ok(())
}

/// Consecutive updates skipped for a non-finite loss or gradient, and the last checkpoint
/// written before them (or resumed from).
pub(crate) struct NonFiniteGuard {
    pub max: u64,
    pub consecutive: u64,
    pub last_checkpoint: Option<PathBuf>,
}

impl NonFiniteGuard {
    /// Count one update; `Err(NonFinite)` once `max` in a row were skipped.
    pub fn update(&mut self, skipped: bool, at: impl FnOnce() -> String) -> Result<()> {
        if !skipped {
            self.consecutive = 0;
            return Ok(());
        }
        self.consecutive += 1;
        if self.consecutive >= self.max {
            return Err(RlError::NonFinite { count: self.consecutive, at: at(), checkpoint: self.last_checkpoint.clone() });
        }
        Ok(())
    }
}


/// The checkpoint's stamp `saved` against this run's `now`: equal, or differing only where
/// `allow` (the differences then printed as a warning). The error lists up to 8 differing keys
/// with both values.
pub fn check_stamp(path: &Path, saved: &ConfigStamp, now: &ConfigStamp, allow: bool) -> Result<()> {
    if saved.config_fingerprint == now.config_fingerprint {
        return Ok(());
    }
    let diffs = saved.differences(now);
    let mut listed: Vec<String> = diffs.iter().take(8).map(|(k, a, b)| format!("`{k}`: {a} in the checkpoint, {b} now")).collect();
    if diffs.len() > 8 {
        listed.push(format!("and {} more", diffs.len() - 8));
    }
    if diffs.is_empty() {
        listed.push("the stored config list does not match its fingerprint (edited by hand?)".into());
    }
    let what = listed.join("; ");
    if allow {
        eprintln!("warning: {}: resuming under a changed config (allow_config_change = true): {what}", path.display());
        return Ok(());
    }
    Err(RlError::io(
        path,
        format!(
            "`config_fingerprint`: the checkpoint was written under a different config: {what}. Resume with the run's \
             config (<out>/config.toml), or set allow_config_change = true to continue under the new one"
        ),
    ))
}
