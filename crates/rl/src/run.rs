//! The main job: warm-up (supervised), then RL steps — rollouts through the in-process engine
//! (batch-invariant kernels: its logprobs and routes are what the trainer computes), rewards,
//! GRPO advantages, packing with routes, `mini_steps` replayed updates, weight sync (the engine
//! shares the trainer's weight storage), periodic evaluation, metrics JSONL, checkpoints, and
//! the HTML report. A stop flag (Ctrl-C) ends the run after the current step with a checkpoint
//! that `--resume` continues bit for bit.
//!
//! Over ranks ([`RunOptions::parallel`]: `lockstep train --ranks N` with thread ranks, or one
//! process per GPU under `lockstep launch`), every rank holds the replicated weights and its
//! shard of the experts; rollouts and every update are split over the ranks by whole groups
//! (group g on rank g mod N, the updates taking the same groups as one rank would), the
//! gradients of the replicated weights are summed and the metrics reduced, so the RL steps are
//! the single-rank steps up to floating-point summation order; the warm-up batch (one
//! micro-batch) is trained whole by rank 0, so the warm-up is the single-rank one bit for bit
//! (the doc of `warmup` says why it is not split). Rank 0 writes the metrics,
//! report and checkpoints; a checkpoint is an ordinary one (the experts gathered), which any
//! number of ranks can resume.
//!
//! Guards: an update (RL or warm-up) whose loss or gradient norm is not finite is skipped by the
//! trainer and counted (`skipped_nonfinite` in the step record); `trainer.max_nonfinite_steps`
//! in a row stop the run with [`RlError::NonFinite`], naming the last checkpoint written before
//! them (none is written while updates are being skipped). A checkpoint directory, its
//! run_state.json included, appears atomically; run_state.json is range-checked on resume and
//! its config fingerprint compared (`run_state`: a changed key is refused unless `allow_config_change`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use lockstep_trainer::parallel::Parallel;
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_engine::Engine;
use lockstep_model::{Kernels, MoeCausalLm};
use lockstep_trace::pack::{pack, PackConfig};
use lockstep_trainer::optim::{AdamWConfig, Schedule};
use lockstep_trainer::trainer::{TrainBatch, Trainer, TrainerConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::RunConfig;
use crate::env::Environment;
use crate::error::{Result, RlError};
use crate::metrics::{self, LayerRecord, StepRecord};
use crate::rollout::{self, EvalResult, PromptLog, Rollouter};
use crate::warmup::{stage_config, warmup, warmup_config};
use crate::run_state::{read_run_state, reference_dir, save_checkpoint, start_checkpoints, NonFiniteGuard, RunState};

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
    /// The ranks this run spreads over (`None`: one rank).
    pub parallel: Parallel,
    /// Where the model, trainer and engine run (`None`: the CPU).
    pub device: Option<Device>,
    /// Every prompt sent to the rollout engine (rollouts and evals), in order (tests check
    /// the prompts the engine saw).
    pub prompt_log: Option<PromptLog>,
}

impl RunOptions {
    /// Whether the run stops after this step: the local flag, or (over ranks) any rank's flag,
    /// so that every rank stops at the same step. A collective over ranks.
    fn stopped(&self) -> Result<bool> {
        let local = self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        match &self.parallel {
            None => Ok(local),
            Some(dp) => Ok(dp.all_gather_host(&[f64::from(u8::from(local))])?.iter().any(|r| r[0] > 0.0)),
        }
    }

    fn device(&self) -> Device {
        self.device.clone().unwrap_or(Device::Cpu)
    }

    /// Whether this process writes the run's files (rank 0, or the only rank).
    fn writes(&self) -> bool {
        self.parallel.as_ref().is_none_or(|dp| dp.rank() == 0)
    }

    /// A trainer on this run's ranks from a whole model.
    fn trainer(&self, model: MoeCausalLm, cfg: TrainerConfig) -> Result<Trainer> {
        Ok(match &self.parallel {
            None => Trainer::new(model, cfg)?,
            Some(dp) => Trainer::new_parallel(model, cfg, dp.clone())?,
        })
    }

    fn resume_trainer(&self, dir: &Path, cfg: TrainerConfig, kernels: Kernels) -> Result<Trainer> {
        let mut t = match &self.parallel {
            None => Trainer::resume(dir, cfg, &self.device())?,
            Some(dp) => Trainer::resume_parallel(dir, cfg, &self.device(), dp.clone())?,
        };
        t.model.set_kernels(kernels);
        Ok(t)
    }
}

/// `model.kernels`: "invariant" (the default, on the CPU and on CUDA: the engine's decode and
/// the trainer's packed forward give the same log-probabilities bit for bit) or "standard"
/// (candle's kernels, cuBLAS on a GPU: faster at large sizes, the two sides agree to rounding —
/// the KL metric shows how closely).
fn kernels_for(cfg: &RunConfig) -> Kernels {
    match cfg.model.kernels.as_str() {
        "standard" => Kernels::Autograd,
        _ => Kernels::Invariant,
    }
}

/// A trainer with a new config over the same (possibly sharded) model and ranks.
fn reconfigure(t: Trainer, cfg: TrainerConfig) -> Result<Trainer> {
    let parallel = t.parallel.clone();
    let mut n = Trainer::new(t.master_model()?, cfg)?;
    n.parallel = parallel;
    n.shard_optimizer_state()?;
    Ok(n)
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub out_dir: PathBuf,
    pub warmup_eval: f64,
    pub first_reward: f64,
    pub last_reward: f64,
    pub final_eval: f64,
    /// mean held-out reward after the warm-up and at the last eval
    pub warmup_eval_reward: f64,
    pub final_eval_reward: f64,
    pub records: Vec<StepRecord>,
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
        temperature: cfg.rollout.temperature as f64,
        ..stage_config(cfg)
    }
}

fn base_model(cfg: &RunConfig, dev: &Device) -> Result<MoeCausalLm> {
    let mut m = match &cfg.model.checkpoint {
        Some(dir) => MoeCausalLm::load(Path::new(dir), DType::F32, dev)?,
        None => MoeCausalLm::embedded_default(cfg.model.seed, DType::F32, dev)?,
    };
    m.set_kernels(kernels_for(cfg));
    Ok(m)
}

/// The rollout engine for policy version `version`: in process (sharing the trainer's weight
/// storage), or the configured servers after loading the current weights.
fn rollouter(cfg: &RunConfig, trainer: &Trainer, out: &Path, version: u64) -> Result<Rollouter> {
    if cfg.rollout.servers.is_empty() {
        let mut model = trainer.inference_model()?;
        match cfg.rollout.mismatch.as_str() {
            // the engine's weights rounded to bf16 (kept in the model's dtype: the CPU kernels are f32)
            "bf16" => model.map_params(|_, t| t.to_dtype(DType::BF16)?.to_dtype(t.dtype()))?,
            // candle's fused inference kernels (cuBLAS on a GPU) against the trainer's invariant ones
            "standard" => model.set_kernels(Kernels::Inference),
            _ => {}
        }
        let mut e = Engine::new(model);
        // the trainer shares the device: a KV pool for the rollouts' lengths, not the server's
        // default of 32K tokens per sequence (a longer request is refused by name at submit)
        e.cache.max_model_len = 4096;
        // the pool is capped by max_running × max_model_len; the trainer's states fill most of
        // the device, so the engine may use whatever is free
        e.cache.gpu_memory_fraction = 1.0;
        e.policy_version = version;
        return Ok(Rollouter::Local(Box::new(e), trainer.parallel.clone()));
    }
    let specs = cfg.rollout.server_specs()?;
    if specs.iter().any(|s| s.kind != crate::config::ServerKind::Lockstep) {
        let mut f = crate::foreign::ForeignEngine::new(specs, crate::foreign::layout_of(&trainer.model.cfg)?);
        f.policy_version = version;
        f.sync_weights(&trainer.model, out)?;
        return Ok(Rollouter::Foreign(f));
    }
    let remote = crate::remote::RemoteEngine::new(specs.into_iter().map(|s| s.url).collect());
    let dir = out.join("weights-sync");
    trainer.model.save(&dir)?;
    // the server stamps its own strictly increasing version (`version` is the local engine's)
    remote.load_weights(&dir)?;
    Ok(Rollouter::Remote(remote))
}

/// Sum of a value over the run's ranks (the value itself on one rank): a collective.
fn global_sum(p: &Parallel, x: f64) -> Result<f64> {
    match p {
        None => Ok(x),
        Some(dp) => Ok(lockstep_trainer::parallel::sum_over_ranks(dp.as_ref(), &[x])?[0]),
    }
}

/// Run the whole job (`replay` overrides `[replay] enabled`), writing under `out`.
pub fn run(cfg: &RunConfig, out: &Path, replay: bool, opts: &RunOptions) -> Result<RunSummary> {
    if let Some(dp) = &opts.parallel {
        cfg.validate_ranks(dp.world_size())?;
    }
    let writes = opts.writes();
    let dev = opts.device();
    if writes {
        std::fs::create_dir_all(out).map_err(|e| RlError::io(out, e))?;
        // the effective config (replay and directory as run): `--config <out>/config.toml --resume ..` continues it
        let cfg_path = out.join("config.toml");
        let mut effective = cfg.clone();
        effective.replay.enabled = replay;
        effective.output.dir = out.display().to_string();
        std::fs::write(&cfg_path, effective.to_toml()).map_err(|e| RlError::io(&cfg_path, e))?;
    }
    let env: Box<dyn Environment> = crate::text_env::build(cfg)?;
    let skipped_records = env.skipped();
    // `task.epochs`: the run ends after that many passes over the training records
    let cfg = &capped(cfg, env.as_ref());
    // what run_state.json stamps and a resume checks; leftovers of interrupted saves cleaned
    let stamp = start_checkpoints(cfg, replay, out, opts.resume.as_deref(), writes)?;
    let log = opts.prompt_log.as_ref();
    let run_t0 = Instant::now();
    let metrics_path = out.join("metrics.jsonl");
    // the records of this run (rank 0 also appends them to metrics.jsonl)
    let mut records: Vec<StepRecord> = Vec::new();
    let record = |rec: StepRecord, records: &mut Vec<StepRecord>| -> Result<()> {
        if writes {
            metrics::append(&metrics_path, &rec)?;
        }
        records.push(rec);
        Ok(())
    };
    let bar = if opts.progress && writes { ProgressBar::new(cfg.steps) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}").expect("valid template"));

    if !cfg.rollout.servers.is_empty() {
        // fail fast (before the warm-up) on a server that is down or is not a lockstep server
        let specs = cfg.rollout.server_specs()?;
        if specs.iter().any(|s| s.kind != crate::config::ServerKind::Lockstep) {
            crate::foreign::check(&specs)?;
        } else {
            crate::remote::RemoteEngine::new(specs.into_iter().map(|s| s.url).collect()).check()?;
        }
    }

    // --- model and trainer: fresh (warm-up first) or resumed
    let state = match &opts.resume {
        Some(dir) => Some(read_run_state(dir, cfg, &stamp)?),
        None => None,
    };
    let mut guard = NonFiniteGuard { max: cfg.trainer.max_nonfinite_steps, consecutive: 0, last_checkpoint: opts.resume.clone() };
    let (mut trainer, start, warmup_eval) = match (&opts.resume, state) {
        (Some(dir), Some(st)) if st.warmup_step.is_none() => {
            let mut t = opts.resume_trainer(dir, trainer_config(cfg, replay), kernels_for(cfg))?;
            if cfg.loss.kl_coef > 0.0 {
                let rd = reference_dir(out);
                t.set_reference_model(MoeCausalLm::load(&rd, DType::F32, &dev)?)?;
            }
            // keep the metrics of the steps before the checkpoint
            if writes && metrics_path.exists() {
                let kept: Vec<StepRecord> = metrics::read(&metrics_path)?.into_iter().filter(|r| r.phase == "warmup" || r.step <= st.rl_step).collect();
                std::fs::remove_file(&metrics_path).map_err(|e| RlError::io(&metrics_path, e))?;
                for r in kept {
                    record(r, &mut records)?;
                }
            }
            // rl_step <= steps (read_run_state); the add is checked all the same
            let start = st.rl_step.checked_add(1).ok_or_else(|| RlError::io(&dir.join("run_state.json"), "`rl_step`: out of range"))?;
            (t, start, st.warmup_eval)
        }
        (resume, st) => {
            // from scratch, or from a checkpoint taken during the warm-up
            if writes {
                let _ = std::fs::remove_file(&metrics_path);
            }
            let (t, from) = match (resume, st.and_then(|s| s.warmup_step)) {
                (Some(dir), Some(done)) => (opts.resume_trainer(dir, warmup_config(cfg), kernels_for(cfg))?, done),
                _ => (opts.trainer(base_model(cfg, &dev)?, warmup_config(cfg))?, 0),
            };
            let (warm, stopped, warm_skipped) = warmup(t, from, env.as_ref(), cfg, &bar, (&dev, &|| opts.stopped()), &mut guard, (out, &stamp))?;
            if let Some(done) = stopped {
                let dir = out.join("checkpoints").join(format!("warmup-{done}"));
                save_checkpoint(&warm, &dir, &RunState { rl_step: 0, warmup_eval: 0.0, warmup_step: Some(done) }, &stamp)?;
                bar.abandon();
                return Err(RlError::Interrupted { after: format!("warm-up step {done}/{}", cfg.warmup.steps), checkpoint: dir });
            }
            let mut t = reconfigure(warm, trainer_config(cfg, replay))?;
            if cfg.loss.kl_coef > 0.0 {
                t.set_reference()?;
                t.save(&reference_dir(out))?;
            }
            let ev = rollout::evaluate(&mut rollouter(cfg, &t, out, 0)?, env.as_ref(), cfg, eval_seed(cfg, 0), log)?;
            let acc = ev.accuracy;
            let mut rec = StepRecord { phase: "warmup".into(), step: 0, replay, skipped_nonfinite: warm_skipped, skipped_records, ..StepRecord::default() };
            eval_into(&mut rec, &ev);
            if writes {
                rollout::write_samples(out, &ev)?;
            }
            record(rec, &mut records)?;
            if opts.stopped()? && cfg.steps > 0 {
                let dir = out.join("checkpoints").join("step-0");
                save_checkpoint(&t, &dir, &RunState { rl_step: 0, warmup_eval: acc, warmup_step: None }, &stamp)?;
                guard.last_checkpoint = Some(dir.clone());
                bar.abandon();
                return Err(RlError::Interrupted { after: "the warm-up".into(), checkpoint: dir });
            }
            (t, 1, acc)
        }
    };
    bar.set_position(start - 1);
    if opts.progress && writes {
        bar.println(trainer.memory_plan(cfg.trainer.token_budget).to_string());
    }

    lockstep_model::memory_peak(&dev, true)?; // each step's record carries its own peak (restarted here and after each)
    for step in start..=cfg.steps {
        let t0 = Instant::now();
        // weight sync: the in-process engine reads the trainer's weight storage; servers load a
        // checkpoint of the current weights
        let mut engine = rollouter(cfg, &trainer, out, step)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9e37_79b9).wrapping_add(step));
        let first = (step - 1).saturating_mul(cfg.rollout.prompts_per_step as u64);
        let ro = rollout::collect(&mut engine, env.as_ref(), cfg, &mut rng, cfg.seed ^ step, first, log)?;

        // zero-variance groups (all rewards equal: no GRPO signal) are dropped when asked
        let keep: Vec<bool> = ro.groups.iter().map(|g| !cfg.rollout.filter_zero_variance || rollout::has_signal(g)).collect();
        let filtered = global_sum(&opts.parallel, keep.iter().filter(|&&k| !k).count() as f64)?;
        // mini-steps: whole groups per update (the global groups c·per .. (c+1)·per, this
        // rank's of them); the later ones are off-policy
        let per = cfg.rollout.prompts_per_step.div_ceil(cfg.trainer.mini_steps);
        let mut minis: Vec<Vec<TrainBatch>> = Vec::new();
        for c in 0..cfg.rollout.prompts_per_step.div_ceil(per) {
            let samples: Vec<_> = ro.groups.iter().zip(&ro.index).zip(&keep).filter(|((_, &i), &k)| k && i / per == c).flat_map(|((g, _), _)| g.iter().cloned()).collect();
            let mbs = if samples.is_empty() { Vec::new() } else { pack(&samples, &PackConfig { token_budget: cfg.trainer.token_budget, pad_to_multiple: 1, pad_token: 0 })? };
            let tbs: Vec<TrainBatch> = mbs.iter().map(|mb| TrainBatch::from_micro_batch(mb, &dev)).collect::<std::result::Result<_, _>>()?;
            minis.push(tbs);
        }
        let mut rec = StepRecord {
            phase: "rl".into(),
            step,
            replay,
            reward_mean: ro.reward_mean,
            completion_tokens: ro.completion_tokens,
            filtered_groups: filtered as usize,
            reward_parts: ro.reward_parts.clone(),
            reward_metrics: ro.reward_metrics.clone(),
            ..StepRecord::default()
        };
        // decoupled PPO: π_old is the trainer's score of the whole rollout batch before any update
        if cfg.loss.pi_old == "recompute" {
            let (mut kl, mut ext, mut tok) = (0.0, 0.0, 0.0);
            for tbs in &mut minis {
                let sm = trainer.score(tbs)?;
                kl += sm.kl * sm.tokens;
                ext += sm.extreme_fraction * sm.tokens;
                tok += sm.tokens;
                rec.old_infer_logprob_diff_max = rec.old_infer_logprob_diff_max.max(sm.max_abs_logprob_diff);
            }
            if tok > 0.0 {
                (rec.old_infer_kl, rec.old_infer_extreme_fraction) = (kl / tok, ext / tok);
            }
        }
        let mut layer_sums: std::collections::BTreeMap<usize, (LayerRecord, f64)> = Default::default();
        let mut updates = 0f64;
        let mut stopped_nonfinite = None;
        'updates: for _epoch in 0..cfg.trainer.epochs {
            for tbs in &minis {
                let local: f64 = tbs.iter().map(TrainBatch::loss_tokens).sum();
                if global_sum(&opts.parallel, local)? == 0.0 {
                    continue; // every group of this update was filtered
                }
                let m = trainer.step(tbs)?;
                // the same decision on every rank (the trainer checks the global loss and norm)
                if let Err(e) = guard.update(m.skipped_nonfinite, || format!("RL step {step}/{}", cfg.steps)) {
                    rec.skipped_nonfinite += 1;
                    stopped_nonfinite = Some(e);
                    break 'updates;
                }
                if m.skipped_nonfinite {
                    rec.skipped_nonfinite += 1;
                    continue; // nothing was applied; its metrics stay out of the means
                }
                if updates == 0.0 {
                    rec.train_infer_kl = m.infer_kl;
                    rec.train_infer_extreme_fraction = m.infer_extreme_fraction;
                    rec.train_infer_logprob_diff_max = m.max_abs_logprob_diff;
                }
                updates += 1.0;
                rec.loss += m.loss;
                rec.kl += m.kl;
                rec.kl_max = rec.kl_max.max(m.kl);
                rec.extreme_fraction += m.extreme_fraction;
                rec.clip_fraction += m.clip_fraction;
                rec.grad_norm += m.grad_norm;
                rec.entropy += m.entropy;
                rec.ref_kl += m.ref_kl;
                rec.shift_weight += m.shift_weight;
                rec.fallback_tokens += m.fallback_tokens;
                for (l, x) in m.layers {
                    let e = layer_sums.entry(l).or_default();
                    e.0.confidence += x.confidence;
                    e.0.max_vio += x.max_vio;
                    e.0.max_vio_rank_max += x.max_vio_rank_max;
                    e.0.route_agreement += x.route_agreement;
                    e.0.max_vio_prime_rl += x.max_vio_prime_rl;
                    e.1 += 1.0;
                }
            }
        }
        rec.updates = updates as usize;
        let updates = updates.max(1.0);
        for v in [&mut rec.loss, &mut rec.kl, &mut rec.extreme_fraction, &mut rec.clip_fraction, &mut rec.grad_norm, &mut rec.entropy, &mut rec.ref_kl, &mut rec.shift_weight] {
            *v /= updates;
        }
        rec.layers = layer_sums
            .into_iter()
            .map(|(l, (s, n))| {
                let r = LayerRecord {
                    confidence: s.confidence / n,
                    max_vio: s.max_vio / n,
                    max_vio_rank_max: s.max_vio_rank_max / n,
                    route_agreement: s.route_agreement / n,
                    max_vio_prime_rl: s.max_vio_prime_rl / n,
                };
                (l, r)
            })
            .collect();
        if let Some(e) = stopped_nonfinite {
            // the record of the step that stopped (its skipped updates counted), then the error
            rec.seconds = t0.elapsed().as_secs_f64();
            record(rec, &mut records)?;
            bar.abandon();
            return Err(e);
        }
        if step % cfg.eval.every == 0 || step == cfg.steps {
            let ev = rollout::evaluate(&mut rollouter(cfg, &trainer, out, step)?, env.as_ref(), cfg, eval_seed(cfg, step), log)?;
            eval_into(&mut rec, &ev);
            if writes {
                rollout::write_samples(out, &ev)?;
            }
        }
        rec.seconds = t0.elapsed().as_secs_f64();
        rec.peak_memory_gb = lockstep_model::memory_peak(&dev, true)?.map(|b| b as f64 / 1e9);
        let (msg_reward, msg_kl, msg_eval) = (rec.reward_mean, rec.kl, rec.eval_accuracy);
        let conf: f64 = rec.layers.values().map(|l| l.confidence).sum::<f64>() / rec.layers.len().max(1) as f64;
        record(rec, &mut records)?;
        bar.set_message(format!("reward {msg_reward:.3} kl {msg_kl:.2e} conf {conf:.3}{}", msg_eval.map(|a| format!(" eval {a:.3}")).unwrap_or_default()));
        bar.inc(1);
        let stop = opts.stopped()? && step < cfg.steps;
        let periodic = cfg.output.checkpoint_every > 0 && (step % cfg.output.checkpoint_every == 0 || step == cfg.steps);
        if periodic && !stop && guard.consecutive > 0 {
            // the last update was skipped (non-finite): keep the last good checkpoint the newest
            if writes {
                eprintln!("warning: step {step}: no checkpoint while updates are skipped for non-finite values ({} in a row)", guard.consecutive);
            }
        } else if stop || periodic {
            let dir = out.join("checkpoints").join(format!("step-{step}"));
            save_checkpoint(&trainer, &dir, &RunState { rl_step: step, warmup_eval, warmup_step: None }, &stamp)?;
            guard.last_checkpoint = Some(dir.clone());
            if stop {
                bar.abandon();
                if writes {
                    let records = metrics::read(&metrics_path)?;
                    let header = crate::report::Header::of(cfg, run_t0.elapsed().as_secs_f64(), rollout::read_samples(out));
                    crate::report::write_with(&out.join("report.html"), &[(if replay { "replay on" } else { "replay off" }.to_string(), records)], "lockstep train (interrupted)", Some(&header))?;
                }
                return Err(RlError::Interrupted { after: format!("step {step}/{}", cfg.steps), checkpoint: dir });
            }
        }
    }
    bar.finish();
    // rank 0: the whole file (steps before a resume included); other ranks: this process's records
    let records = if writes { metrics::read(&metrics_path)? } else { records };
    let rl: Vec<&StepRecord> = records.iter().filter(|r| r.phase == "rl").collect();
    let final_eval = rl.iter().rev().find_map(|r| r.eval_accuracy).unwrap_or(warmup_eval);
    let summary = RunSummary {
        out_dir: out.to_path_buf(),
        warmup_eval,
        first_reward: rl.first().map(|r| r.reward_mean).unwrap_or(0.0),
        last_reward: rl.last().map(|r| r.reward_mean).unwrap_or(0.0),
        final_eval,
        warmup_eval_reward: records.iter().find(|r| r.phase == "warmup").and_then(|r| r.eval_reward).unwrap_or(0.0),
        final_eval_reward: rl.iter().rev().find_map(|r| r.eval_reward).or_else(|| records.iter().find(|r| r.phase == "warmup").and_then(|r| r.eval_reward)).unwrap_or(0.0),
        records: records.clone(),
    };
    if writes {
        let header = crate::report::Header::of(cfg, run_t0.elapsed().as_secs_f64(), rollout::read_samples(out));
        crate::report::write_with(&out.join("report.html"), &[(if replay { "replay on" } else { "replay off" }.to_string(), records)], "lockstep train", Some(&header))?;
    }
    Ok(summary)
}

/// The config with `steps` capped at `task.epochs` passes over the training records.
fn capped(cfg: &RunConfig, env: &dyn Environment) -> RunConfig {
    let mut c = cfg.clone();
    if let (e @ 1.., Some(n)) = (cfg.task.epochs, env.train_size()) {
        let steps = (e.saturating_mul(n as u64)).div_ceil(cfg.rollout.prompts_per_step as u64);
        c.steps = c.steps.min(steps.max(1));
    }
    c
}

/// The sampling seed of the eval after RL step `step` (pass@k).
fn eval_seed(cfg: &RunConfig, step: u64) -> u64 {
    cfg.seed ^ 0xe7a1_0000 ^ step
}

fn eval_into(rec: &mut StepRecord, ev: &EvalResult) {
    rec.eval_accuracy = Some(ev.accuracy);
    rec.eval_reward = Some(ev.reward);
    rec.eval_pass_at = ev.pass_at.clone();
}
