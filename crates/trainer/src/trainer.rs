//! One optimizer step over packed micro-batches: forward with replayed routes (or free routing),
//! token log-probabilities at the sampling temperature, the RL loss, backward, gradient
//! accumulation, AdamW — and the step's metrics, routing health per MoE layer included.
//! [`Trainer::score`] computes π_old for decoupled PPO; [`Trainer::set_reference`] freezes a
//! reference model for the KL penalty.
//!
//! Legend: N token slots of a micro-batch, K experts per token.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};

pub use crate::batch::{replay_from_recording, OldPolicy, TrainBatch};
use crate::step_metrics::finite_or_zero;
pub use crate::step_metrics::{LayerStepMetrics, ScoreMetrics, SftMetrics, StepMetrics};
use crate::error::{Result, TrainError};
use crate::loss::{rl_loss, LossConfig, LossInputs, Objective, PiOld, RatioMode};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, StepStats};
use crate::phases::PhaseTimer;
use crate::parallel::{sum_over_ranks, DataParallel, Parallel};
use crate::staged::{GradTargets, StageOptions, Staged};
use crate::health::{accumulate_health, load_max_vio, LayerAcc};
use crate::step_inputs::{check_joint, plan, route_inputs, route_probs_at};
use crate::zero::ZeroState;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    pub loss: LossConfig,
    pub optimizer: AdamWConfig,
    /// Force the inference routes (R3); off = the trainer routes freely.
    pub replay: bool,
    /// The sampling temperature T of the rollouts: log-probabilities (and entropy) are of
    /// softmax(logits / T), as the engine recorded them.
    pub temperature: f64,
    /// Drop each decoder layer's activations after its forward and recompute them in the
    /// backward (bitwise the same gradients; see [`crate::staged`]). Default off.
    pub activation_checkpointing: bool,
    /// Token positions per chunk of the LM head + log-softmax (+ entropy) and of its backward:
    /// a micro-batch never holds more than [chunk, vocab] logits. 0: the whole micro-batch.
    /// Default 1024.
    pub logits_chunk_tokens: usize,
    /// Compute dtype of the weights and activations: f32 (default), or bf16 with f32 master
    /// weights and AdamW moments in the optimizer and gradients accumulated in f32 (router
    /// scores, log-softmax, loss and metrics are f32 either way).
    pub dtype: DType,
    /// Over more than one rank: each rank keeps only a 1/W slice of every replicated
    /// parameter's optimizer state (f32 master copy, AdamW moments); gradients are
    /// reduce-scattered and the updated slices all-gathered ([`crate::zero`]). The experts'
    /// state is the rank's own either way. Ignored on one rank. Default off.
    pub shard_optimizer: bool,
    /// Time every phase of a step (`StepMetrics::phases`), synchronising the device at each
    /// phase's end: for benchmarks ([`crate::phases`]). Default off.
    pub time_phases: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            optimizer: AdamWConfig::default(),
            replay: true,
            temperature: 1.0,
            activation_checkpointing: false,
            logits_chunk_tokens: 1024,
            dtype: DType::F32,
            shard_optimizer: false,
            time_phases: false,
        }
    }
}

pub struct Trainer {
    pub model: MoeCausalLm,
    pub params: Vec<(String, Var)>,
    pub optimizer: AdamW,
    pub cfg: TrainerConfig,
    /// The ranks this trainer is spread over (`None`: one rank holds everything).
    pub parallel: Parallel,
    /// Frozen reference policy of the KL penalty (`set_reference`).
    reference: Option<MoeCausalLm>,
    /// This rank's slices of the replicated parameters' optimizer state, once sharded
    /// (`shard_optimizer` over ranks; until then the state is whole in `optimizer`).
    pub(crate) zero: Option<ZeroState>,
}


fn vec_tensor(v: &[f32], dev: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), v.len(), dev)?)
}

impl Trainer {
    /// Take a model (best in f32: its weights become the master weights) and make its
    /// parameters trainable in `cfg.dtype`.
    pub fn new(mut model: MoeCausalLm, cfg: TrainerConfig) -> Result<Self> {
        if !matches!(cfg.dtype, DType::F32 | DType::BF16) {
            return Err(TrainError::input("dtype", format!("{:?}: expected f32 or bf16", cfg.dtype)));
        }
        let mut params = Vec::new();
        let mut master = std::collections::HashMap::new();
        model.map_params(|name, t| {
            let w = t.to_dtype(DType::F32)?;
            let v = Var::from_tensor(&w.to_dtype(cfg.dtype)?)?;
            if cfg.dtype != DType::F32 {
                // the optimizer updates its master in place: an f32 weight may be shared with
                // the caller's model (a clone), so the master is a copy of it
                let own = if t.dtype() == DType::F32 { w.copy()? } else { w.clone() };
                master.insert(name.to_string(), own);
            }
            params.push((name.to_string(), v.clone()));
            Ok(v.as_tensor().clone())
        })?;
        // the parameters are in cfg.dtype already: this sets the activations' dtype
        model.cast(cfg.dtype)?;
        if matches!(cfg.loss.ratio, RatioMode::Joint(_)) {
            if !cfg.replay {
                return Err(TrainError::input("loss.ratio", "a joint ratio with replay off compares different events (the trainer's own experts vs the inference experts): set replay.enabled = true"));
            }
            check_joint(&model)?;
        }
        if !(cfg.temperature > 0.0 && cfg.temperature.is_finite()) {
            return Err(TrainError::input("temperature", format!("{}: must be > 0", cfg.temperature)));
        }
        let mut optimizer = AdamW::new(cfg.optimizer)?;
        optimizer.master = master;
        Ok(Self { model, params, optimizer, cfg, parallel: None, reference: None, zero: None })
    }

    /// Freeze a copy of the current weights as the reference policy π_ref of the KL penalty
    /// (`loss.kl_coef`); on ranks, each rank keeps its own shard.
    pub fn set_reference(&mut self) -> Result<()> {
        let mut r = self.model.clone();
        r.map_params(|_, t| t.detach().copy())?;
        self.reference = Some(r);
        Ok(())
    }

    /// Use `model` (a whole model, e.g. loaded from the run's `reference/` checkpoint) as the
    /// frozen reference; over ranks it is sharded as the trainer's own model.
    pub fn set_reference_model(&mut self, mut model: MoeCausalLm) -> Result<()> {
        if let Some(dp) = &self.parallel {
            dp.shard_model(&mut model)?;
        }
        model.cast(self.cfg.dtype)?;
        model.set_kernels(self.model.kernels());
        self.reference = Some(model);
        Ok(())
    }

    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// Take a whole model (the same on every rank), keep this rank's experts and train over the
    /// ranks of `dp` (see [`crate::parallel`]).
    pub fn new_parallel(mut model: MoeCausalLm, cfg: TrainerConfig, dp: std::sync::Arc<dyn DataParallel>) -> Result<Self> {
        dp.shard_model(&mut model)?;
        let mut t = Self::new(model, cfg)?;
        t.parallel = Some(dp);
        t.shard_optimizer_state()?;
        Ok(t)
    }

    /// The ranks the optimizer state is sharded over: `Some` with `shard_optimizer` on more
    /// than one rank.
    pub fn state_shards(&self) -> Option<&std::sync::Arc<dyn DataParallel>> {
        self.parallel.as_ref().filter(|dp| self.cfg.shard_optimizer && dp.world_size() > 1)
    }

    /// With [`Trainer::state_shards`]: move the replicated parameters' whole optimizer state
    /// into this rank's slices (done by [`Trainer::new_parallel`], and by the first step of a
    /// trainer whose `parallel` was set by hand). Nothing otherwise, or when done already.
    pub fn shard_optimizer_state(&mut self) -> Result<()> {
        if self.zero.is_some() {
            return Ok(());
        }
        if let Some(dp) = self.state_shards().cloned() {
            self.zero = Some(ZeroState::take_from(&mut self.optimizer, &self.params, dp.as_ref())?);
        }
        Ok(())
    }

    /// This rank's slices of the optimizer state when it is sharded ([`crate::zero`]).
    pub fn zero_state(&self) -> Option<&ZeroState> {
        self.zero.as_ref()
    }

    /// Global loss normaliser and the number of micro-batch rounds every rank runs.
    fn rounds(&self, local_tokens: f64, local_micro: usize) -> Result<(f64, usize)> {
        match &self.parallel {
            None => Ok((local_tokens, local_micro)),
            Some(dp) => {
                let all = dp.all_gather_host(&[local_tokens, local_micro as f64])?;
                Ok((all.iter().map(|r| r[0]).sum(), all.iter().map(|r| r[1] as usize).max().unwrap_or(0)))
            }
        }
    }

    /// A micro-batch that contributes nothing (two pad tokens, loss mask 0): what a rank with
    /// fewer micro-batches forwards so that the expert-parallel collectives stay in step.
    fn empty_batch(&self) -> Result<TrainBatch> {
        Ok(TrainBatch {
            batch: Batch::packed(&[0, 0], None, &[0, 2], self.model.device())?,
            logp_infer: vec![0.0; 2],
            advantages: vec![0.0; 2],
            loss_mask: vec![0.0; 2],
            routes: None,
            old: None,
        })
    }

    /// The global gradient norm: the local one, or (over ranks) after the replicated gradients
    /// are summed (a collective; every rank gets the same norm).
    fn grad_norm(&self, acc: &mut GradAccumulator) -> Result<f64> {
        match &self.parallel {
            None => Ok(crate::optim::grad_sq_sum(self.params.iter().map(|(n, _)| n.as_str()), acc)?.sqrt()),
            Some(dp) => dp.reduce_grads(&self.params, acc),
        }
    }

    /// Clip against the global norm and update, unless the (global) loss or the norm is not
    /// finite: then nothing changes (weights, moments, step counter) and `None` is returned.
    /// Both values are the same on every rank, so every rank decides alike.
    fn apply_if_finite(&mut self, acc: &mut GradAccumulator, global_loss: f64) -> Result<(f64, Option<StepStats>)> {
        if let Some(dp) = self.state_shards().cloned() {
            self.shard_optimizer_state()?;
            let zero = self.zero.as_mut().ok_or_else(|| TrainError::input("shard_optimizer", "optimizer state not sharded"))?;
            return crate::zero::step(&mut self.optimizer, zero, dp.as_ref(), &self.params, acc, global_loss);
        }
        let norm = self.grad_norm(acc)?;
        if !(global_loss.is_finite() && norm.is_finite()) {
            return Ok((norm, None));
        }
        Ok((norm, Some(self.optimizer.apply_with_grad_norm(&self.params, acc, norm)?)))
    }

    fn stage_options(&self) -> StageOptions {
        StageOptions { checkpoint: self.cfg.activation_checkpointing, chunk_tokens: self.cfg.logits_chunk_tokens, temperature: self.cfg.temperature }
    }

    /// Forward + loss + backward of one micro-batch; gradients go into `acc`.
    fn micro_step(&self, tb: &TrainBatch, denominator: f64, acc: &mut GradAccumulator, m: &mut StepMetrics, layer_acc: &mut BTreeMap<usize, LayerAcc>, timer: &mut PhaseTimer) -> Result<()> {
        tb.check()?;
        let dev = self.model.device().clone();
        let loss_cfg = &self.cfg.loss;
        let routing = plan(&self.model, tb, self.cfg.replay)?;
        timer.mark("plan")?;
        let targets = GradTargets { entropy: loss_cfg.entropy_coef != 0.0, router_scores: matches!(loss_cfg.ratio, RatioMode::Joint(_)) };
        let scored = tb.scored_slots();
        let out = Staged::forward_scored(&self.model, &tb.batch, &routing, self.stage_options(), true, targets, Some(&scored))?;
        timer.mark("forward")?;
        let (logp, valid) = (out.logp.clone(), out.valid.clone());
        let mask: Vec<f32> = tb.loss_mask.iter().zip(&valid).map(|(&m, &v)| if v { m } else { 0.0 }).collect();
        let route = route_inputs(&self.model, tb, &out.routes, loss_cfg.ratio, loss_cfg.pi_old)?;
        let logp_old = match (loss_cfg.pi_old, &tb.old) {
            (PiOld::Infer, _) => None,
            (PiOld::Recompute, Some(o)) => Some(vec_tensor(&o.logp, &dev)?),
            (PiOld::Recompute, None) => return Err(TrainError::input("old", "pi_old = recompute: score the batch first (Trainer::score)")),
        };
        let logp_ref = match &self.reference {
            Some(r) if loss_cfg.kl_coef != 0.0 => {
                let rp = plan(r, tb, self.cfg.replay)?;
                Some(Staged::forward_scored(r, &tb.batch, &rp, self.stage_options(), false, GradTargets::none(), Some(&scored))?.logp)
            }
            _ => None,
        };
        let entropy = out.entropy.clone();
        let mut inputs = LossInputs::new(logp, vec_tensor(&tb.logp_infer, &dev)?, vec_tensor(&tb.advantages, &dev)?, vec_tensor(&mask, &dev)?);
        inputs.logp_old = logp_old;
        inputs.route_logp_train = route.route_logp_train;
        inputs.route_logp_old = route.route_logp_old;
        inputs.joint_available = route.joint_available.map(|a| vec_tensor(&a, &dev)).transpose()?;
        inputs.shift_weight = route.shift_weight.map(|g| vec_tensor(&g, &dev)).transpose()?;
        inputs.logp_ref = logp_ref;
        if loss_cfg.entropy_coef != 0.0 {
            inputs.entropy = Some(entropy.clone());
        }
        if matches!(loss_cfg.objective, Objective::Gspo { .. }) {
            inputs.sequence = Some(sample_ids(&tb.batch));
        }
        let (loss, lm) = rl_loss(loss_cfg, &inputs, denominator)?;
        drop(inputs);
        let routes = out.routes.clone();
        timer.mark("loss")?;
        out.backward_timed(&loss, &self.params, acc, timer)?;

        // metrics (weighted by tokens, divided at the end)
        let t = lm.tokens;
        m.loss += loss.to_scalar::<f32>()? as f64;
        m.kl += lm.kl * t;
        m.max_abs_logprob_diff = m.max_abs_logprob_diff.max(lm.max_abs_logprob_diff);
        m.extreme_fraction += lm.extreme_fraction * t;
        m.clip_fraction += lm.clip_fraction * t;
        m.infer_kl += lm.infer_kl * t;
        m.infer_extreme_fraction += lm.infer_extreme_fraction * t;
        m.ref_kl += lm.ref_kl * t;
        m.shift_weight += lm.shift_weight * t;
        m.tokens += t;
        m.fallback_tokens += lm.fallback_tokens;
        m.mis_dropped += lm.mis_dropped;
        let ent: Vec<f32> = entropy.detach().to_vec1()?;
        m.entropy += ent.iter().zip(&mask).map(|(&h, &w)| (h * w) as f64).sum::<f64>();
        accumulate_health(&self.model, &routes, tb, layer_acc)?;
        timer.mark("metrics")?;
        Ok(())
    }

    /// π_old for decoupled PPO (`loss.pi_old = "recompute"`): score every micro-batch of the
    /// rollout batch with the current weights before any update — no gradient, the inference
    /// routes replayed (when replay is on) — and keep the token log-probabilities and the router
    /// probabilities at the replayed experts in `TrainBatch::old`. Over ranks, every rank runs
    /// the same number of forwards (empty rounds pad), as in [`Trainer::step`].
    pub fn score(&self, micro: &mut [TrainBatch]) -> Result<ScoreMetrics> {
        let local: f64 = micro.iter().map(TrainBatch::loss_tokens).sum();
        let (_, rounds) = self.rounds(local, micro.len())?;
        let empty = if rounds > micro.len() { Some(self.empty_batch()?) } else { None };
        let tau = self.cfg.loss.extreme_tau;
        let (mut tokens, mut k3, mut extreme, mut max_diff) = (0f64, 0f64, 0f64, 0f64);
        for i in 0..rounds {
            let Some(tb) = micro.get_mut(i) else {
                let tb = empty.as_ref().ok_or_else(|| TrainError::input("<ranks>", "no batch for an empty round"))?;
                Staged::forward(&self.model, &tb.batch, &RoutingPlan::compute(), self.stage_options(), false, GradTargets::none())?;
                continue;
            };
            tb.check()?;
            let routing = plan(&self.model, tb, self.cfg.replay)?;
            let scored = tb.scored_slots();
            let out = Staged::forward_scored(&self.model, &tb.batch, &routing, self.stage_options(), false, GradTargets::none(), Some(&scored))?;
            let (logp, valid) = (out.logp.clone(), out.valid.clone());
            let logp: Vec<f32> = logp.to_vec1()?;
            for ((&lo, &li), (&m, &v)) in logp.iter().zip(&tb.logp_infer).zip(tb.loss_mask.iter().zip(&valid)) {
                if m > 0.0 && v {
                    let d = (lo - li) as f64;
                    let r = d.exp();
                    tokens += 1.0;
                    k3 += r - 1.0 - d;
                    extreme += f64::from(u8::from(r.max(1.0 / r) > tau));
                    max_diff = max_diff.max(d.abs());
                }
            }
            let route_probs = route_probs_at(&self.model, tb, &out.routes)?;
            tb.old = Some(OldPolicy { logp, route_probs });
        }
        let mut v = [tokens, k3, extreme];
        if let Some(dp) = &self.parallel {
            let s = sum_over_ranks(dp.as_ref(), &v)?;
            v = [s[0], s[1], s[2]];
            max_diff = dp.all_gather_host(&[max_diff])?.iter().map(|r| r[0]).fold(max_diff, f64::max);
        }
        let per = |x: f64| if v[0] > 0.0 { x / v[0] } else { 0.0 };
        Ok(ScoreMetrics { tokens: v[0], kl: per(v[1]), extreme_fraction: per(v[2]), max_abs_logprob_diff: max_diff })
    }

    /// One optimizer step over the micro-batches of a step (this rank's share of the global
    /// batch when the trainer is parallel). When the step's loss or global gradient norm is not
    /// finite (NaN / inf; decided from the reduced values, so alike on every rank) the update
    /// is skipped: weights, AdamW moments and step counter stay as they were, and the returned
    /// metrics have `skipped_nonfinite` set and every non-finite value written as 0.
    pub fn step(&mut self, micro: &[TrainBatch]) -> Result<StepMetrics> {
        let (denominator, rounds) = self.rounds(micro.iter().map(TrainBatch::loss_tokens).sum(), micro.len())?;
        if denominator == 0.0 {
            return Err(TrainError::input("loss_mask", "no completion tokens in the step"));
        }
        let mut acc = GradAccumulator::default();
        let mut m = StepMetrics::default();
        let mut layer_acc = BTreeMap::new();
        let mut timer = PhaseTimer::new(self.model.device(), self.cfg.time_phases);
        timer.restart()?;
        let empty = if rounds > micro.len() { Some(self.empty_batch()?) } else { None };
        for i in 0..rounds {
            match (micro.get(i), &empty) {
                (Some(tb), _) => self.micro_step(tb, denominator, &mut acc, &mut m, &mut layer_acc, &mut timer)?,
                // metrics of an empty round are dropped
                (None, Some(tb)) => self.micro_step(tb, denominator, &mut acc, &mut StepMetrics::default(), &mut BTreeMap::new(), &mut timer)?,
                (None, None) => unreachable!("an empty batch pads the missing rounds"),
            }
        }
        // the metrics first: over ranks, m.loss becomes the global loss the check needs
        self.reduce_metrics(&mut m, &mut layer_acc)?;
        timer.mark("reduce")?;
        let (norm, stats) = self.apply_if_finite(&mut acc, m.loss)?;
        timer.mark("optimizer")?;
        m.phases = std::mem::take(&mut timer.secs);
        let stats = match stats {
            Some(s) => s,
            None => {
                m.skipped_nonfinite = true;
                StepStats { grad_norm: norm, lr: self.optimizer.cfg.lr_at(self.optimizer.step + 1) }
            }
        };
        let per = |x: f64| if m.tokens > 0.0 { x / m.tokens } else { 0.0 };
        m.kl = per(m.kl);
        m.extreme_fraction = per(m.extreme_fraction);
        m.clip_fraction = per(m.clip_fraction);
        m.entropy = per(m.entropy);
        m.infer_kl = per(m.infer_kl);
        m.infer_extreme_fraction = per(m.infer_extreme_fraction);
        m.ref_kl = per(m.ref_kl);
        m.shift_weight = if m.tokens > 0.0 { m.shift_weight / m.tokens } else { 1.0 };
        m.grad_norm = stats.grad_norm;
        m.lr = stats.lr;
        m.step = self.optimizer.step;
        m.layers = layer_acc
            .into_iter()
            .map(|(l, a)| {
                let d = if a.tokens > 0.0 { a.tokens } else { 1.0 };
                let max_vio = load_max_vio(&a.load);
                let rank_max = if self.parallel.is_some() { a.rank_max_vio } else { max_vio };
                (
                    l,
                    LayerStepMetrics {
                        confidence: a.confidence / d,
                        max_vio,
                        max_vio_rank_max: rank_max,
                        route_agreement: if a.compared > 0.0 { a.agreement / a.compared } else { 0.0 },
                        max_vio_prime_rl: if a.prime_count > 0.0 { a.prime_sum / a.prime_count } else { 0.0 },
                    },
                )
            })
            .collect();
        if m.skipped_nonfinite {
            m.sanitize();
        }
        Ok(m)
    }

    /// Over ranks: sum the step's metric sums and every layer's sums and load.
    fn reduce_metrics(&self, m: &mut StepMetrics, layer_acc: &mut BTreeMap<usize, LayerAcc>) -> Result<()> {
        let Some(dp) = &self.parallel else { return Ok(()) };
        let e = self.model.cfg.moe.router.num_experts;
        let mut v = vec![
            m.loss,
            m.kl,
            m.extreme_fraction,
            m.clip_fraction,
            m.entropy,
            m.tokens,
            m.fallback_tokens,
            m.mis_dropped,
            m.infer_kl,
            m.infer_extreme_fraction,
            m.ref_kl,
            m.shift_weight,
        ];
        const SCALARS: usize = 12;
        // every rank lists the same layers (a rank may have seen none of them)
        let layers = self.model.cfg.moe_layers.clone();
        for l in &layers {
            let a = layer_acc.entry(*l).or_default();
            a.load.resize(e, 0.0);
            v.extend([a.confidence, a.agreement, a.compared, a.tokens, a.prime_sum, a.prime_count]);
            v.extend(&a.load);
        }
        // one exchange: the sums, then each layer's max_vio of this rank's load (maximised)
        let summed = v.len();
        v.extend(layers.iter().map(|l| load_max_vio(&layer_acc[l].load)));
        v.push(m.max_abs_logprob_diff);
        let all = dp.all_gather_host(&v)?;
        let mut sum = vec![0f64; summed];
        let mut rank_max = vec![f64::NEG_INFINITY; layers.len()];
        for r in &all {
            if r.len() != v.len() {
                return Err(TrainError::input("<ranks>", format!("a rank sent {} metric values, {} expected", r.len(), v.len())));
            }
            sum.iter_mut().zip(&r[..summed]).for_each(|(s, x)| *s += x);
            rank_max.iter_mut().zip(&r[summed..]).for_each(|(s, x)| *s = s.max(*x));
            m.max_abs_logprob_diff = m.max_abs_logprob_diff.max(r[v.len() - 1]);
        }
        [m.loss, m.kl, m.extreme_fraction, m.clip_fraction, m.entropy, m.tokens, m.fallback_tokens, m.mis_dropped] =
            [sum[0], sum[1], sum[2], sum[3], sum[4], sum[5], sum[6], sum[7]];
        [m.infer_kl, m.infer_extreme_fraction, m.ref_kl, m.shift_weight] = [sum[8], sum[9], sum[10], sum[11]];
        let mut at = SCALARS;
        for (l, max) in layers.iter().zip(rank_max) {
            let Some(a) = layer_acc.get_mut(l) else { continue };
            (a.confidence, a.agreement, a.compared, a.tokens, a.prime_sum, a.prime_count) = (sum[at], sum[at + 1], sum[at + 2], sum[at + 3], sum[at + 4], sum[at + 5]);
            a.load = sum[at + 6..at + 6 + e].to_vec();
            a.rank_max_vio = max;
            at += 6 + e;
        }
        Ok(())
    }
}

impl Trainer {
    /// One supervised step (warm-up): loss = −Σ mask · log π(y) / Σ mask over the
    /// micro-batches (cross-entropy on the masked tokens), free routing, AdamW. Returns the loss
    /// (see [`Trainer::sft_step_checked`]: a non-finite loss or gradient skips the update).
    pub fn sft_step(&mut self, micro: &[TrainBatch]) -> Result<f64> {
        Ok(self.sft_step_checked(micro)?.loss)
    }

    /// [`Trainer::sft_step`] with its gradient norm and whether the update was skipped because
    /// the loss or the gradient norm was not finite (decided alike on every rank).
    pub fn sft_step_checked(&mut self, micro: &[TrainBatch]) -> Result<SftMetrics> {
        let (denominator, rounds) = self.rounds(micro.iter().map(TrainBatch::loss_tokens).sum(), micro.len())?;
        if denominator == 0.0 {
            return Err(TrainError::input("loss_mask", "no supervised tokens in the step"));
        }
        let mut acc = GradAccumulator::default();
        let mut total = 0.0;
        let empty = if rounds > micro.len() { Some(self.empty_batch()?) } else { None };
        for i in 0..rounds {
            let tb = micro.get(i).or(empty.as_ref()).expect("an empty batch pads the missing rounds");
            let compute = RoutingPlan::compute();
            let opts = StageOptions { temperature: 1.0, ..self.stage_options() };
            let scored = tb.scored_slots();
            let out = Staged::forward_scored(&self.model, &tb.batch, &compute, opts, true, GradTargets::none(), Some(&scored))?;
            let mask: Vec<f32> = tb.loss_mask.iter().zip(&out.valid).map(|(&m, &v)| if v { m } else { 0.0 }).collect();
            let mask = vec_tensor(&mask, self.model.device())?;
            let loss = ((&out.logp * mask)?.sum_all()?.neg()? / denominator)?;
            total += loss.to_scalar::<f32>()? as f64;
            out.backward(&loss, &self.params, &mut acc)?;
        }
        let total = match &self.parallel {
            Some(dp) => sum_over_ranks(dp.as_ref(), &[total])?[0],
            None => total,
        };
        let (norm, stats) = self.apply_if_finite(&mut acc, total)?;
        let skipped = stats.is_none();
        let (loss, grad_norm) = if skipped { (finite_or_zero(total), finite_or_zero(norm)) } else { (total, norm) };
        Ok(SftMetrics { loss, grad_norm, skipped_nonfinite: skipped })
    }

    /// The memory plan of a step over micro-batches of `micro_batch_tokens` (see
    /// [`crate::memory`]).
    pub fn memory_plan(&self, micro_batch_tokens: usize) -> crate::memory::MemoryPlan {
        let parameters: u64 = self.params.iter().map(|(_, v)| v.elem_count() as u64).sum();
        let plan = crate::memory::MemoryPlan::of(&self.model.cfg, parameters, self.cfg.dtype, self.cfg.activation_checkpointing, micro_batch_tokens, self.cfg.logits_chunk_tokens);
        let Some(dp) = self.state_shards() else { return plan };
        let w = dp.world_size();
        // the experts' state whole, each replicated parameter's ⌈n / W⌉
        let owned: u64 = self.params.iter().map(|(n, v)| if dp.is_sharded(n) { v.elem_count() } else { v.elem_count().div_ceil(w) } as u64).sum();
        plan.with_sharded_state(owned, w as u64)
    }

    /// The model with f32 weights: the optimizer's master copies where the trainer computes
    /// in bf16, the parameters themselves otherwise (what a checkpoint saves). With the
    /// optimizer state sharded over bf16 ranks, the replicated masters are all-gathered: a
    /// collective then, which every rank calls.
    pub fn master_model(&self) -> Result<MoeCausalLm> {
        let mut m = self.model.clone();
        let gathered = match (&self.zero, &self.parallel) {
            (Some(z), Some(dp)) => z.gather_masters(dp.as_ref(), &self.params)?,
            _ => Default::default(),
        };
        let master = &self.optimizer.master;
        m.map_params(|name, t| match master.get(name).or_else(|| gathered.get(name)) {
            Some(w) => Ok(w.clone()),
            None => t.detach().to_dtype(DType::F32),
        })?;
        m.cast(DType::F32)?;
        Ok(m)
    }

    /// A copy of the model for inference: same weights (shared storage, so it follows later
    /// updates without copying), no autograd tracking.
    pub fn inference_model(&self) -> Result<MoeCausalLm> {
        let mut m = self.model.clone();
        m.map_params(|_, t| Ok(t.detach()))?;
        Ok(m)
    }
}

/// The sample of every slot (its packed row and segment), for sequence-level objectives.
fn sample_ids(batch: &Batch) -> Vec<u32> {
    let (_, t) = batch.dims();
    batch.segments().iter().enumerate().map(|(n, &seg)| ((n / t) as u32) << 16 | seg).collect()
}
