//! The supervised warm-up before the RL steps: cross-entropy on the answers of training
//! instances (the RL loss and its replay requirements do not apply), checkpointed and resumable
//! like the RL steps.

use std::path::Path;

use candle_core::{DType, Device};

use indicatif::ProgressBar;
use lockstep_model::Batch;
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{TrainBatch, Trainer, TrainerConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::RunConfig;
use crate::env::Environment;
use crate::error::Result;
use crate::run_state::{periodic_warmup_checkpoint, ConfigStamp, NonFiniteGuard};

/// What the trainer's config takes from `[model]` and `[trainer]` besides the optimizer and loss.
pub(crate) fn stage_config(cfg: &RunConfig) -> TrainerConfig {
    TrainerConfig {
        activation_checkpointing: cfg.trainer.activation_checkpointing,
        logits_chunk_tokens: cfg.trainer.logits_chunk_tokens,
        shard_optimizer: cfg.trainer.shard_optimizer,
        dtype: if cfg.model.dtype == "bf16" { DType::BF16 } else { DType::F32 },
        ..TrainerConfig::default()
    }
}

pub(crate) fn warmup_config(cfg: &RunConfig) -> TrainerConfig {
    TrainerConfig {
        // the warm-up is supervised: the RL loss (and its replay requirements) does not apply
        loss: lockstep_trainer::loss::LossConfig::default(),
        optimizer: AdamWConfig { lr: cfg.warmup.lr, max_grad_norm: Some(1.0), ..AdamWConfig::default() },
        replay: false,
        temperature: 1.0,
        ..stage_config(cfg)
    }
}

/// Supervised warm-up: cross-entropy on the answers of training instances, from warm-up step
/// `from` (0, or where an interrupted warm-up stopped). Returns the trainer and, when the stop
/// flag ended it before its last step, the number of warm-up steps done. Over ranks, every
/// rank draws the same instances and rank 0 trains on the step's one micro-batch whole (the
/// others run an empty round, their experts serving its tokens): one rank packs the warm-up
/// batch into one micro-batch, and splitting that over the ranks changes the f32 summation of
/// its gradients, which the default warm-up (60 AdamW steps at lr 3e-3 from a fresh init)
/// grows to 1e-3 (replicated) and 4e-3 (experts) in the weights — as splitting it into two
/// micro-batches on one rank does — enough to part the runs at RL step 1. Whole, the warm-up
/// on N ranks is the single-rank warm-up bit for bit (`crates/rl/tests/ranks.rs`).
/// Updates skipped for a non-finite loss or gradient count in `guard` (`max_nonfinite_steps`
/// in a row stop the warm-up with [`RlError::NonFinite`]); the third value is how many were.
/// Every `output.checkpoint_every` steps it checkpoints (`periodic_warmup_checkpoint`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn warmup(mut t: Trainer, from: u64, env: &dyn Environment, cfg: &RunConfig, bar: &ProgressBar, (dev, stopped): (&Device, &dyn Fn() -> Result<bool>), guard: &mut NonFiniteGuard, ck: (&Path, &ConfigStamp)) -> Result<(Trainer, Option<u64>, usize)> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x3a3a);
    // skip the instances of the steps already done
    let mut skipped = 0usize;
    let batch = cfg.warmup.batch as u64;
    for i in 0..from.saturating_mul(batch) {
        env.sample(i, &mut rng);
    }
    let rank = t.parallel.as_ref().map_or(0, |d| d.rank());
    for s in from..cfg.warmup.steps {
        let (mut toks, mut mask, mut cu) = (Vec::new(), Vec::new(), vec![0usize]);
        for j in 0..batch {
            let task = env.sample(s * batch + j, &mut rng);
            if rank != 0 {
                continue; // every rank draws the instances (the same RNG stream); rank 0 trains them
            }
            mask.extend(std::iter::repeat_n(0.0, task.prompt.len()));
            mask.extend(std::iter::repeat_n(1.0, task.answer.len()));
            toks.extend_from_slice(&task.prompt);
            toks.extend_from_slice(&task.answer);
            cu.push(toks.len());
        }
        let n = toks.len();
        let micro = if n == 0 {
            Vec::new() // not rank 0: this rank runs an empty round
        } else {
            vec![TrainBatch::new(Batch::packed(&toks, None, &cu, dev)?, vec![0.0; n], vec![0.0; n], mask, Default::default())?]
        };
        let sm = t.sft_step_checked(&micro)?;
        skipped += usize::from(sm.skipped_nonfinite);
        guard.update(sm.skipped_nonfinite, || format!("warm-up step {}/{}", s + 1, cfg.warmup.steps))?;
        bar.set_message(format!("warm-up {}/{} loss {:.3}{}", s + 1, cfg.warmup.steps, sm.loss, if sm.skipped_nonfinite { " (skipped: non-finite)" } else { "" }));
        bar.tick();
        periodic_warmup_checkpoint(&t, s + 1, cfg, guard, ck)?;
        if stopped()? && s + 1 < cfg.warmup.steps {
            return Ok((t, Some(s + 1), skipped));
        }
    }
    Ok((t, None, skipped))
}
