//! Training checkpoints: a Hugging Face checkpoint directory (`config.json` +
//! `model.safetensors`, per-expert tensors, loadable by transformers) plus the optimizer state
//! (`optimizer.safetensors`: `m.<param>` and `v.<param>`) and `trainer_state.json` (step and
//! optimizer config), written atomically. Resuming continues bit for bit like a run that never
//! stopped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lockstep_model::checkpoint::write_dir_atomically;
use lockstep_model::moe::experts::Experts;
use lockstep_model::MoeCausalLm;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamWConfig;
use crate::parallel::DataParallel;
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
    /// Save model + optimizer state into `dir` (replaced atomically). A parallel trainer
    /// gathers its expert shards and their optimizer moments onto rank 0, which writes an
    /// ordinary checkpoint; every rank must call it (the gathers are collectives), and only
    /// rank 0 touches `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let (model, m, v) = match &self.parallel {
            None => (None, self.optimizer.m.clone(), self.optimizer.v.clone()),
            Some(dp) => {
                let model = self.whole_model(dp.as_ref())?;
                let (mut m, mut v) = (HashMap::new(), HashMap::new());
                // before the first step there are no moments (on every rank alike)
                let params = if self.optimizer.step > 0 { &self.params[..] } else { &[] };
                for (name, var) in params {
                    for (src, dst) in [(&self.optimizer.m, &mut m), (&self.optimizer.v, &mut v)] {
                        // no moment yet (no gradient so far) equals a zero moment
                        let local = match src.get(name) {
                            Some(t) => t.clone(),
                            None => Tensor::zeros(var.shape(), var.dtype(), var.device())?,
                        };
                        let whole = if dp.is_sharded(name) { dp.gather_rows(&local)? } else { local };
                        dst.insert(name.clone(), whole);
                    }
                }
                if dp.rank() != 0 {
                    return Ok(());
                }
                (Some(model), m, v)
            }
        };
        let files = model.as_ref().unwrap_or(&self.model).checkpoint_files()?;
        let mut opt: HashMap<String, Tensor> = HashMap::new();
        for (prefix, map) in [("m", &m), ("v", &v)] {
            for (name, t) in map {
                opt.insert(format!("{prefix}.{name}"), t.to_device(&Device::Cpu)?);
            }
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

    /// The model with every MoE layer's experts gathered from the ranks (a collective).
    pub fn whole_model(&self, dp: &dyn DataParallel) -> Result<MoeCausalLm> {
        let mut whole = self.model.clone();
        for layer in whole.cfg.moe_layers.clone() {
            let block = whole.moe_block_checked_mut(layer)?;
            let kernels = block.experts.kernels();
            let gate_up = dp.gather_rows(&block.experts.gate_up_proj.detach())?;
            let down = dp.gather_rows(&block.experts.down_proj.detach())?;
            block.experts = Experts::from_stacked(gate_up, down)?;
            block.experts.set_kernels(kernels);
            block.expert_parallel = None;
        }
        Ok(whole)
    }

    /// Load a checkpoint saved by [`Trainer::save`] and continue from its step. The optimizer
    /// config comes from the checkpoint; `cfg` supplies the rest (loss, replay).
    pub fn resume(dir: &Path, cfg: TrainerConfig, device: &Device) -> Result<Self> {
        Self::resume_with(dir, cfg, device, None)
    }

    /// [`Trainer::resume`] over the ranks of `dp`: every rank loads the whole checkpoint and
    /// keeps its experts and their optimizer moments (any number of ranks that divides the
    /// experts, whatever the run that saved it used).
    pub fn resume_parallel(dir: &Path, cfg: TrainerConfig, device: &Device, dp: Arc<dyn DataParallel>) -> Result<Self> {
        Self::resume_with(dir, cfg, device, Some(dp))
    }

    fn resume_with(dir: &Path, cfg: TrainerConfig, device: &Device, dp: Option<Arc<dyn DataParallel>>) -> Result<Self> {
        let model = MoeCausalLm::load(dir, DType::F32, device)?;
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| file_err(&state_path, "read", e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| file_err(&state_path, "json", e))?;
        let cfg = TrainerConfig { optimizer: state.optimizer, ..cfg };
        let mut t = match &dp {
            None => Trainer::new(model, cfg)?,
            Some(dp) => Trainer::new_parallel(model, cfg, dp.clone())?,
        };
        let opt_path = dir.join("optimizer.safetensors");
        let opt = candle_core::safetensors::load(&opt_path, device).map_err(|e| file_err(&opt_path, "safetensors", e))?;
        for (name, var) in &t.params {
            for (prefix, map) in [("m", &mut t.optimizer.m), ("v", &mut t.optimizer.v)] {
                let x = match (opt.get(&format!("{prefix}.{name}")), &dp) {
                    (Some(x), Some(dp)) if dp.is_sharded(name) => Some(dp.local_rows(x)?),
                    (x, _) => x.cloned(),
                };
                match x {
                    Some(x) if x.dims() == var.dims() => {
                        map.insert(name.clone(), x);
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
