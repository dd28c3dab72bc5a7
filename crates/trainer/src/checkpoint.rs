//! Training checkpoints: a Hugging Face checkpoint directory (`config.json` +
//! `model.safetensors`, per-expert tensors, loadable by transformers) plus the optimizer state
//! (`optimizer.safetensors`: `m.<param>` and `v.<param>`) and `trainer_state.json` (step and
//! optimizer config), written atomically with `lockstep-manifest.json` (size and SHA-256 of each
//! tensor file, checked on resume) through `lockstep_model::manifest`'s writer; every write,
//! fsync and rename of a save goes through a [`CheckpointFs`] ([`Trainer::save_with_fs`]), so
//! tests can fail any one of them. Resuming continues bit for bit like a run that never
//! stopped.
//!
//! Over ranks the checkpoint is still an ordinary single-rank one: expert shards and their
//! moments are gathered, and with a sharded optimizer (`shard_optimizer`, [`crate::zero`])
//! each replicated parameter's moment and master slices are all-gathered one parameter at a
//! time, rank 0 moving each whole tensor to the host at once (no device holds more than one
//! extra whole parameter's state), so a run resumes on any rank count, sharded or not; a
//! resume re-slices. One file rather than per-rank shard files with a manifest of the slicing:
//! the format every other path already reads, and no re-slicing rules to keep in step.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lockstep_model::moe::experts::Experts;
use lockstep_model::MoeCausalLm;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamWConfig;
use crate::parallel::DataParallel;
use crate::trainer::{Trainer, TrainerConfig};
use crate::zero::Slicing;

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    optimizer: AdamWConfig,
}

fn file_err(path: &Path, what: &str, msg: impl ToString) -> TrainError {
    TrainError::File { file: path.display().to_string(), what: what.into(), msg: msg.to_string() }
}

pub use lockstep_model::manifest::{clean_stale_in, clean_stale_siblings, CheckpointFs, DirWriter, RealFs, MANIFEST};

/// Write checkpoint `dir` atomically ([`lockstep_model::manifest`]): stale siblings of an
/// interrupted save are cleaned, `fill` writes every file into a fresh temporary sibling (given
/// its path), the manifest of its tensor files is added, each file and the temporary directory
/// are fsynced, the old `dir` (if any) is moved aside, the temporary directory renamed into
/// place, the parent fsynced, and the old one removed. A kill at any point leaves the old or the
/// new checkpoint complete (or, between the two renames, the old one aside, which the next save
/// or [`clean_stale_siblings`] moves back).
pub fn write_checkpoint_dir(dir: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    write_checkpoint_dir_inner(dir, fill, |_| Ok(()))
}

/// [`write_checkpoint_dir`] with a hook called after the temporary directory is complete and
/// fsynced, before any rename (fault injection in tests: an error there leaves `dir` as it was).
#[doc(hidden)]
pub fn write_checkpoint_dir_inner(dir: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>, before_rename: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let fs = BeforeRename { hook: std::sync::Mutex::new(Some(Box::new(before_rename))) };
    Ok(lockstep_model::manifest::write_dir_atomically_with(&fs, dir, |w| fill(w.path()))?)
}

type Hook<'a> = Box<dyn FnOnce(&Path) -> std::io::Result<()> + 'a>;

/// The real filesystem, running a hook (once) before the first rename.
struct BeforeRename<'a> {
    hook: std::sync::Mutex<Option<Hook<'a>>>,
}

impl CheckpointFs for BeforeRename<'_> {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        RealFs.create_dir_all(path)
    }
    fn write_file(&self, path: &Path, write: &dyn Fn(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
        RealFs.write_file(path, write)
    }
    fn sync(&self, path: &Path) -> std::io::Result<()> {
        RealFs.sync(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let hook = self.hook.lock().map_err(|_| std::io::Error::other("hook poisoned"))?.take();
        if let Some(h) = hook {
            h(from)?;
        }
        RealFs.rename(from, to)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        RealFs.remove_dir_all(path)
    }
}

impl Trainer {
    /// Save model + optimizer state into `dir` (replaced atomically). A parallel trainer
    /// gathers its expert shards and their optimizer moments onto rank 0, which writes an
    /// ordinary checkpoint; every rank must call it (the gathers are collectives), and only
    /// rank 0 touches `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with(dir, &[])
    }

    /// [`Trainer::save`] with `extra` files (name, contents; e.g. the RL loop's
    /// `run_state.json`) written into the same temporary directory before the rename, so the
    /// checkpoint appears with all of them or not at all (see [`write_checkpoint_dir`]).
    pub fn save_with(&self, dir: &Path, extra: &[(&str, Vec<u8>)]) -> Result<()> {
        self.save_with_fs(&RealFs, dir, extra)
    }

    /// [`Trainer::save_with`] through `fs` (every write, fsync and rename of the save is one of
    /// its calls: tests fail the Nth to check that a torn save never shows).
    pub fn save_with_fs(&self, fs: &dyn CheckpointFs, dir: &Path, extra: &[(&str, Vec<u8>)]) -> Result<()> {
        let reserved = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", MANIFEST];
        if let Some((name, _)) = extra.iter().find(|(n, _)| n.is_empty() || n.contains(['/', '\\']) || *n == "." || *n == ".." || reserved.contains(n)) {
            return Err(file_err(dir, &format!("extra file `{name}`"), "a plain file name, not one of the checkpoint's own, expected"));
        }
        let (model, m, v) = match &self.parallel {
            None => (None, self.optimizer.m.clone(), self.optimizer.v.clone()),
            Some(dp) => {
                let model = self.whole_model(dp.as_ref())?;
                let rank0 = dp.rank() == 0;
                let (mut m, mut v) = (HashMap::new(), HashMap::new());
                // before the first step there are no moments (on every rank alike)
                let params = if self.optimizer.step > 0 { &self.params[..] } else { &[] };
                // one whole moment at a time on the device: rank 0 moves each to the host, the
                // others drop theirs
                for (name, var) in params {
                    for (second, dst) in [(false, &mut m), (true, &mut v)] {
                        let whole = self.whole_moment(dp.as_ref(), name, var, second)?;
                        if rank0 {
                            dst.insert(name.clone(), whole.to_device(&Device::Cpu)?);
                        }
                    }
                }
                if !rank0 {
                    return Ok(());
                }
                (Some(model), m, v)
            }
        };
        // the f32 master weights where the trainer computes in bf16
        let files = match model {
            Some(m) => m.checkpoint_files()?,
            None => self.master_model()?.checkpoint_files()?,
        };
        let mut opt: HashMap<String, Tensor> = HashMap::new();
        for (prefix, map) in [("m", &m), ("v", &v)] {
            for (name, t) in map {
                opt.insert(format!("{prefix}.{name}"), t.to_device(&Device::Cpu)?);
            }
        }
        let state = serde_json::to_string_pretty(&TrainerState { step: self.optimizer.step, optimizer: self.optimizer.cfg })
            .map_err(|e| file_err(dir, "trainer_state.json", e))?;
        Ok(lockstep_model::manifest::write_dir_atomically_with(fs, dir, |w| {
            files.write_into(w)?;
            w.write_tensors("optimizer.safetensors", &opt)?;
            w.write_bytes("trainer_state.json", state.as_bytes())?;
            for (name, bytes) in extra {
                w.write_bytes(name, bytes)?;
            }
            Ok(())
        })?)
    }

    /// A parameter's whole first (`second` false) or second moment from the ranks: an expert
    /// shard's rows gathered, a sharded optimizer's slices all-gathered, else this rank's own;
    /// zeros where there is none yet (no gradient so far). A collective.
    fn whole_moment(&self, dp: &dyn DataParallel, name: &str, var: &Var, second: bool) -> Result<Tensor> {
        if let Some(z) = self.zero.as_ref().filter(|_| !dp.is_sharded(name)) {
            return z.gather_moment(dp, name, var, second);
        }
        let src = if second { &self.optimizer.v } else { &self.optimizer.m };
        let local = match src.get(name) {
            Some(t) => t.clone(),
            None => Tensor::zeros(var.shape(), var.dtype(), var.device())?,
        };
        Ok(if dp.is_sharded(name) { dp.gather_rows(&local)? } else { local })
    }

    /// The model with every MoE layer's experts gathered from the ranks (a collective).
    pub fn whole_model(&self, dp: &dyn DataParallel) -> Result<MoeCausalLm> {
        let mut whole = self.master_model()?;
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
    /// experts, whatever the run that saved it used); with `cfg.shard_optimizer`, only its
    /// slices of the replicated parameters' moments (and master copies) as well. The moments
    /// are read from the mapped file one tensor at a time and only this rank's part of each
    /// goes to the device.
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
        lockstep_model::manifest::verify(dir, std::slice::from_ref(&opt_path))?;
        let opt = lockstep_model::checkpoint::open_weights(std::slice::from_ref(&opt_path)).map_err(|e| file_err(&opt_path, "safetensors", e))?;
        for (name, var) in &t.params {
            for (prefix, second) in [("m", false), ("v", true)] {
                let key = format!("{prefix}.{name}");
                let x = match opt.get(&key) {
                    Ok(_) => Some(opt.load(&key, &Device::Cpu).map_err(|e| file_err(&opt_path, &format!("tensor `{key}`"), e))?),
                    Err(_) => None,
                };
                let x = match (x, &dp) {
                    (Some(x), Some(dp)) if dp.is_sharded(name) => Some(dp.local_rows(&x)?),
                    (x, _) => x,
                };
                match x {
                    Some(x) if x.dims() == var.dims() => {
                        // this rank's slice where the state is sharded, else the tensor
                        let (x, map) = match t.zero.as_mut().filter(|_| dp.as_ref().is_some_and(|dp| !dp.is_sharded(name))) {
                            Some(z) => (Slicing::new(x.elem_count(), z.world)?.slice(&x, z.rank)?, if second { &mut z.v } else { &mut z.m }),
                            None => (x, if second { &mut t.optimizer.v } else { &mut t.optimizer.m }),
                        };
                        map.insert(name.clone(), x.to_device(device)?);
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
