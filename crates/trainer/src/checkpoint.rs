//! Training checkpoints: a Hugging Face checkpoint directory (`config.json` +
//! `model.safetensors`, per-expert tensors, loadable by transformers) plus the optimizer state
//! (`optimizer.safetensors`: `m.<param>` and `v.<param>`) and `trainer_state.json` (step and
//! optimizer config), written atomically. Resuming continues bit for bit like a run that never
//! stopped.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lockstep_model::checkpoint::write_dir_atomically;
use lockstep_model::MoeCausalLm;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamWConfig;
use crate::trainer::{Trainer, TrainerConfig};

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    optimizer: AdamWConfig,
}

fn file_err(path: &Path, what: &str, msg: impl ToString) -> TrainError {
    TrainError::File { file: path.display().to_string(), what: what.into(), msg: msg.to_string() }
}

impl Trainer {
    /// Save model + optimizer state into `dir` (replaced atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let files = self.model.checkpoint_files()?;
        let mut opt: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in &self.optimizer.m {
            opt.insert(format!("m.{name}"), t.to_device(&Device::Cpu)?);
        }
        for (name, t) in &self.optimizer.v {
            opt.insert(format!("v.{name}"), t.to_device(&Device::Cpu)?);
        }
        let state = serde_json::to_string_pretty(&TrainerState { step: self.optimizer.step, optimizer: self.optimizer.cfg })
            .map_err(|e| file_err(dir, "trainer_state.json", e))?;
        write_dir_atomically(dir, |tmp| {
            files.write(tmp)?;
            candle_core::safetensors::save(&opt, tmp.join("optimizer.safetensors")).map_err(std::io::Error::other)?;
            std::fs::write(tmp.join("trainer_state.json"), state)
        })?;
        Ok(())
    }

    /// Load a checkpoint saved by [`Trainer::save`] and continue from its step. The optimizer
    /// config comes from the checkpoint; `cfg` supplies the rest (loss, replay).
    pub fn resume(dir: &Path, cfg: TrainerConfig, device: &Device) -> Result<Self> {
        let model = MoeCausalLm::load(dir, DType::F32, device)?;
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| file_err(&state_path, "read", e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| file_err(&state_path, "json", e))?;
        let mut t = Trainer::new(model, TrainerConfig { optimizer: state.optimizer, ..cfg })?;
        let opt_path = dir.join("optimizer.safetensors");
        let opt = candle_core::safetensors::load(&opt_path, device).map_err(|e| file_err(&opt_path, "safetensors", e))?;
        for (name, var) in &t.params {
            for (prefix, map) in [("m", &mut t.optimizer.m), ("v", &mut t.optimizer.v)] {
                match opt.get(&format!("{prefix}.{name}")) {
                    Some(x) if x.dims() == var.dims() => {
                        map.insert(name.clone(), x.clone());
                    }
                    Some(x) => {
                        return Err(file_err(&opt_path, &format!("tensor `{prefix}.{name}`"), format!("shape {:?}, parameter is {:?}", x.dims(), var.dims())))
                    }
                    None if state.step == 0 => {}
                    None => return Err(file_err(&opt_path, &format!("tensor `{prefix}.{name}`"), "missing")),
                }
            }
        }
        t.optimizer.step = state.step;
        Ok(t)
    }
}
