//! The main job: warm-up (supervised), then RL steps — rollouts through the in-process engine
//! (batch-invariant kernels: its logprobs and routes are what the trainer computes), rewards,
//! GRPO advantages, packing with routes, `mini_steps` replayed updates, weight sync (the engine
//! shares the trainer's weight storage), periodic evaluation, metrics JSONL, checkpoints, and
//! the HTML report. A stop flag (Ctrl-C) ends the run after the current step with a checkpoint
//! that `--resume` continues bit for bit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_engine::Engine;
use lockstep_model::{Batch, Kernels, MoeCausalLm};
use lockstep_trace::pack::{pack, PackConfig};
use lockstep_trainer::optim::{AdamWConfig, Schedule};
use lockstep_trainer::trainer::{TrainBatch, Trainer, TrainerConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::env::{Addition, Environment};
use crate::error::{Result, RlError};
use crate::metrics::{self, LayerRecord, StepRecord};
use crate::rollout::{self, Rollouter};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from a checkpoint directory written by a previous run.
    pub resume: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Checked after every warm-up and RL step: once set, the run finishes the step, writes a
    /// checkpoint + run_state.json (as the periodic checkpoints) and returns
    /// [`RlError::Interrupted`] naming it.
    pub stop: Option<Arc<AtomicBool>>,
}

impl RunOptions {
    fn stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub out_dir: PathBuf,
    pub warmup_eval: f64,
    pub first_reward: f64,
    pub last_reward: f64,
    pub final_eval: f64,
    pub records: Vec<StepRecord>,
}

#[derive(Serialize, Deserialize)]
struct RunState {
    rl_step: u64,
    warmup_eval: f64,
    /// Set in a checkpoint taken during the warm-up: warm-up steps done (the trainer and its
    /// optimizer state are the warm-up's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warmup_step: Option<u64>,
}

/// Trainer checkpoint + run_state.json.
fn save_checkpoint(trainer: &Trainer, dir: &Path, st: &RunState) -> Result<()> {
    trainer.save(dir)?;
    let text = serde_json::to_string(st).map_err(|e| RlError::io(dir, e))?;
    let path = dir.join("run_state.json");
    std::fs::write(&path, text).map_err(|e| RlError::io(&path, e))
}

fn trainer_config(cfg: &RunConfig, replay: bool) -> TrainerConfig {
    TrainerConfig {
        loss: cfg.loss_config(),
        optimizer: AdamWConfig {
            lr: cfg.trainer.lr,
            weight_decay: cfg.trainer.weight_decay,
            max_grad_norm: Some(cfg.trainer.max_grad_norm),
            warmup_steps: cfg.trainer.warmup_steps,
            schedule: Schedule::Constant,
            ..AdamWConfig::default()
        },
        replay,
    }
}

fn base_model(cfg: &RunConfig) -> Result<MoeCausalLm> {
    let mut m = match &cfg.model.checkpoint {
        Some(dir) => MoeCausalLm::load(Path::new(dir), DType::F32, &Device::Cpu)?,
        None => MoeCausalLm::embedded_default(cfg.model.seed, DType::F32, &Device::Cpu)?,
    };
    m.set_kernels(Kernels::Invariant);
    Ok(m)
}

fn warmup_config(cfg: &RunConfig) -> TrainerConfig {
    TrainerConfig {
        loss: cfg.loss_config(),
        optimizer: AdamWConfig { lr: cfg.warmup.lr, max_grad_norm: Some(1.0), ..AdamWConfig::default() },
        replay: false,
    }
}

/// Supervised warm-up: cross-entropy on the answers of training instances, from warm-up step
/// `from` (0, or where an interrupted warm-up stopped). Returns the trainer and, when the stop
/// flag ended it before its last step, the number of warm-up steps done.
fn warmup(mut t: Trainer, from: u64, env: &dyn Environment, cfg: &RunConfig, bar: &ProgressBar, opts: &RunOptions) -> Result<(Trainer, Option<u64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x3a3a);
    // skip the instances of the steps already done
    for _ in 0..from * cfg.warmup.batch as u64 {
        env.sample(&mut rng);
    }
    for s in from..cfg.warmup.steps {
        let (mut toks, mut mask, mut cu) = (Vec::new(), Vec::new(), vec![0usize]);
        for _ in 0..cfg.warmup.batch {
            let task = env.sample(&mut rng);
            mask.extend(std::iter::repeat_n(0.0, task.prompt.len()));
            mask.extend(std::iter::repeat_n(1.0, task.answer.len()));
            toks.extend_from_slice(&task.prompt);
            toks.extend_from_slice(&task.answer);
            cu.push(toks.len());
        }
        let n = toks.len();
        let tb = TrainBatch {
            batch: Batch::packed(&toks, None, &cu, &Device::Cpu)?,
            logp_infer: vec![0.0; n],
            advantages: vec![0.0; n],
            loss_mask: mask,
            routes: Default::default(),
        };
        let loss = t.sft_step(&[tb])?;
        bar.set_message(format!("warm-up {}/{} loss {loss:.3}", s + 1, cfg.warmup.steps));
        bar.tick();
        if opts.stopped() && s + 1 < cfg.warmup.steps {
            return Ok((t, Some(s + 1)));
        }
    }
    Ok((t, None))
}

/// The rollout engine for policy version `version`: in process (sharing the trainer's weight
/// storage), or the configured servers after loading the current weights.
fn rollouter(cfg: &RunConfig, trainer: &Trainer, out: &Path, version: u64) -> Result<Rollouter> {
    if cfg.rollout.servers.is_empty() {
        let mut e = Engine::new(trainer.inference_model()?);
        e.policy_version = version;
        return Ok(Rollouter::Local(Box::new(e)));
    }
    let remote = crate::remote::RemoteEngine::new(cfg.rollout.servers.clone());
    let dir = out.join("weights-sync");
    trainer.model.save(&dir)?;
    remote.load_weights(&dir, version)?;
    Ok(Rollouter::Remote(remote))
}

/// Run the whole job (`replay` overrides `[replay] enabled`), writing under `out`.
pub fn run(cfg: &RunConfig, out: &Path, replay: bool, opts: &RunOptions) -> Result<RunSummary> {
    std::fs::create_dir_all(out).map_err(|e| RlError::io(out, e))?;
    // the effective config (replay and directory as run): `--config <out>/config.toml --resume ..` continues it
    let cfg_path = out.join("config.toml");
    let mut effective = cfg.clone();
    effective.replay.enabled = replay;
    effective.output.dir = out.display().to_string();
    std::fs::write(&cfg_path, effective.to_toml()).map_err(|e| RlError::io(&cfg_path, e))?;
    let env: Box<dyn Environment> = Box::new(Addition { digits: cfg.task.digits });
    let metrics_path = out.join("metrics.jsonl");
    let bar = if opts.progress { ProgressBar::new(cfg.steps) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}").expect("valid template"));
    let max_answer = cfg.rollout.max_tokens;

    if !cfg.rollout.servers.is_empty() {
        // fail fast (before the warm-up) on a server that is down or is not a lockstep server
        crate::remote::RemoteEngine::new(cfg.rollout.servers.clone()).check()?;
    }

    // --- model and trainer: fresh (warm-up first) or resumed
    let state = match &opts.resume {
        Some(dir) => {
            let st_path = dir.join("run_state.json");
            let text = std::fs::read_to_string(&st_path).map_err(|e| RlError::io(&st_path, e))?;
            Some(serde_json::from_str::<RunState>(&text).map_err(|e| RlError::io(&st_path, e))?)
        }
        None => None,
    };
    let (mut trainer, start, warmup_eval) = match (&opts.resume, state) {
        (Some(dir), Some(st)) if st.warmup_step.is_none() => {
            let mut t = Trainer::resume(dir, trainer_config(cfg, replay), &Device::Cpu)?;
            t.model.set_kernels(Kernels::Invariant);
            // keep the metrics of the steps before the checkpoint
            if metrics_path.exists() {
                let kept: Vec<StepRecord> = metrics::read(&metrics_path)?.into_iter().filter(|r| r.phase == "warmup" || r.step <= st.rl_step).collect();
                std::fs::remove_file(&metrics_path).map_err(|e| RlError::io(&metrics_path, e))?;
                for r in &kept {
                    metrics::append(&metrics_path, r)?;
                }
            }
            (t, st.rl_step + 1, st.warmup_eval)
        }
        (resume, st) => {
            // from scratch, or from a checkpoint taken during the warm-up
            let _ = std::fs::remove_file(&metrics_path);
            let (t, from) = match (resume, st.and_then(|s| s.warmup_step)) {
                (Some(dir), Some(done)) => {
                    let mut t = Trainer::resume(dir, warmup_config(cfg), &Device::Cpu)?;
                    t.model.set_kernels(Kernels::Invariant);
                    (t, done)
                }
                _ => (Trainer::new(base_model(cfg)?, warmup_config(cfg))?, 0),
            };
            let (warm, stopped) = warmup(t, from, env.as_ref(), cfg, &bar, opts)?;
            if let Some(done) = stopped {
                let dir = out.join("checkpoints").join(format!("warmup-{done}"));
                save_checkpoint(&warm, &dir, &RunState { rl_step: 0, warmup_eval: 0.0, warmup_step: Some(done) })?;
                bar.abandon();
                return Err(RlError::Interrupted { after: format!("warm-up step {done}/{}", cfg.warmup.steps), checkpoint: dir });
            }
            let t = Trainer::new(warm.model, trainer_config(cfg, replay))?;
            let acc = rollout::evaluate(&mut rollouter(cfg, &t, out, 0)?, env.as_ref(), max_answer)?;
            metrics::append(&metrics_path, &StepRecord { phase: "warmup".into(), step: 0, replay, eval_accuracy: Some(acc), ..StepRecord::default() })?;
            if opts.stopped() && cfg.steps > 0 {
                let dir = out.join("checkpoints").join("step-0");
                save_checkpoint(&t, &dir, &RunState { rl_step: 0, warmup_eval: acc, warmup_step: None })?;
                bar.abandon();
                return Err(RlError::Interrupted { after: "the warm-up".into(), checkpoint: dir });
            }
            (t, 1, acc)
        }
    };
    let num_experts = trainer.model.cfg.moe.router.num_experts;
    let fingerprint = lockstep_trace::fingerprint_of(trainer.model.cfg.to_json_string().as_bytes());
    bar.set_position(start - 1);

    for step in start..=cfg.steps {
        let t0 = Instant::now();
        // weight sync: the in-process engine reads the trainer's weight storage; servers load a
        // checkpoint of the current weights
        let mut engine = rollouter(cfg, &trainer, out, step)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9e37_79b9).wrapping_add(step));
        let ro = rollout::collect(&mut engine, env.as_ref(), cfg, &mut rng, cfg.seed ^ step, num_experts, fingerprint)?;

        // mini-steps: whole groups per update; the later ones are off-policy
        let per = ro.groups.len().div_ceil(cfg.trainer.mini_steps);
        let mut rec = StepRecord { phase: "rl".into(), step, replay, reward_mean: ro.reward_mean, completion_tokens: ro.completion_tokens, ..StepRecord::default() };
        let mut layer_sums: std::collections::BTreeMap<usize, (LayerRecord, f64)> = Default::default();
        let mut updates = 0.0;
        for chunk in ro.groups.chunks(per) {
            let samples: Vec<_> = chunk.iter().flatten().cloned().collect();
            let mbs = pack(&samples, &PackConfig { token_budget: cfg.trainer.token_budget, pad_to_multiple: 1, pad_token: 0 })?;
            let tbs: Vec<TrainBatch> = mbs.iter().map(|mb| TrainBatch::from_micro_batch(mb, &Device::Cpu)).collect::<std::result::Result<_, _>>()?;
            let m = trainer.step(&tbs)?;
            updates += 1.0;
            rec.loss += m.loss;
            rec.kl += m.kl;
            rec.kl_max = rec.kl_max.max(m.kl);
            rec.extreme_fraction += m.extreme_fraction;
            rec.clip_fraction += m.clip_fraction;
            rec.grad_norm += m.grad_norm;
            rec.entropy += m.entropy;
            rec.fallback_tokens += m.fallback_tokens;
            for (l, x) in m.layers {
                let e = layer_sums.entry(l).or_default();
                e.0.confidence += x.confidence;
                e.0.max_vio += x.max_vio;
                e.0.route_agreement += x.route_agreement;
                e.1 += 1.0;
            }
        }
        for v in [&mut rec.loss, &mut rec.kl, &mut rec.extreme_fraction, &mut rec.clip_fraction, &mut rec.grad_norm, &mut rec.entropy] {
            *v /= updates;
        }
        rec.layers = layer_sums
            .into_iter()
            .map(|(l, (s, n))| (l, LayerRecord { confidence: s.confidence / n, max_vio: s.max_vio / n, route_agreement: s.route_agreement / n }))
            .collect();
        if step % cfg.eval.every == 0 || step == cfg.steps {
            rec.eval_accuracy = Some(rollout::evaluate(&mut rollouter(cfg, &trainer, out, step)?, env.as_ref(), max_answer)?);
        }
        rec.seconds = t0.elapsed().as_secs_f64();
        metrics::append(&metrics_path, &rec)?;
        let conf: f64 = rec.layers.values().map(|l| l.confidence).sum::<f64>() / rec.layers.len().max(1) as f64;
        bar.set_message(format!("reward {:.3} kl {:.2e} conf {:.3}{}", rec.reward_mean, rec.kl, conf, rec.eval_accuracy.map(|a| format!(" eval {a:.3}")).unwrap_or_default()));
        bar.inc(1);
        let stop = opts.stopped() && step < cfg.steps;
        if stop || (cfg.output.checkpoint_every > 0 && (step % cfg.output.checkpoint_every == 0 || step == cfg.steps)) {
            let dir = out.join("checkpoints").join(format!("step-{step}"));
            save_checkpoint(&trainer, &dir, &RunState { rl_step: step, warmup_eval, warmup_step: None })?;
            if stop {
                bar.abandon();
                let records = metrics::read(&metrics_path)?;
                crate::report::write(&out.join("report.html"), &[(if replay { "replay on" } else { "replay off" }.to_string(), records)], "lockstep train (interrupted)")?;
                return Err(RlError::Interrupted { after: format!("step {step}/{}", cfg.steps), checkpoint: dir });
            }
        }
    }
    bar.finish();
    let records = metrics::read(&metrics_path)?;
    let rl: Vec<&StepRecord> = records.iter().filter(|r| r.phase == "rl").collect();
    let final_eval = rl.iter().rev().find_map(|r| r.eval_accuracy).unwrap_or(warmup_eval);
    let summary = RunSummary {
        out_dir: out.to_path_buf(),
        warmup_eval,
        first_reward: rl.first().map(|r| r.reward_mean).unwrap_or(0.0),
        last_reward: rl.last().map(|r| r.reward_mean).unwrap_or(0.0),
        final_eval,
        records: records.clone(),
    };
    crate::report::write(&out.join("report.html"), &[(if replay { "replay on" } else { "replay off" }.to_string(), records)], "lockstep train")?;
    Ok(summary)
}
