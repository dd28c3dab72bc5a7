//! What a run keeps between its steps and across a resume: run_state.json (written inside the
//! atomic checkpoint, range-checked on resume), the frozen KL reference's place, and the guard
//! that stops a run after `trainer.max_nonfinite_steps` skipped updates in a row.

use std::path::{Path, PathBuf};

use lockstep_trainer::trainer::Trainer;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Result, RlError};

#[derive(Serialize, Deserialize)]
pub(crate) struct RunState {
    pub rl_step: u64,
    pub warmup_eval: f64,
    /// Set in a checkpoint taken during the warm-up: warm-up steps done (the trainer and its
    /// optimizer state are the warm-up's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_step: Option<u64>,
}

/// The frozen reference of the KL penalty: the model after the warm-up, kept under
/// `<out>/reference` so that a resumed run penalises against the same weights.
pub(crate) fn reference_dir(out: &Path) -> PathBuf {
    out.join("reference")
}

/// Trainer checkpoint + run_state.json, written as one atomic directory (every rank calls it;
/// rank 0 writes): run_state.json goes into the temporary directory with the weights and
/// optimizer state before the rename, so a checkpoint directory always has it.
pub(crate) fn save_checkpoint(trainer: &Trainer, dir: &Path, st: &RunState) -> Result<()> {
    let text = serde_json::to_string(st).map_err(|e| RlError::io(dir, e))?;
    trainer.save_with(dir, &[("run_state.json", text.into_bytes())])?;
    Ok(())
}

/// Read `<dir>/run_state.json` and check it against the config: `rl_step <= steps`,
/// `warmup_step < warmup.steps` (errors name the field and the file).
pub(crate) fn read_run_state(dir: &Path, cfg: &RunConfig) -> Result<RunState> {
    let st_path = dir.join("run_state.json");
    let text = std::fs::read_to_string(&st_path).map_err(|e| RlError::io(&st_path, e))?;
    let st = serde_json::from_str::<RunState>(&text).map_err(|e| RlError::io(&st_path, e))?;
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

