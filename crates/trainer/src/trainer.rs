//! One optimizer step over packed micro-batches: forward with replayed routes (or free routing),
//! token log-probabilities, the RL loss, backward, gradient accumulation, AdamW — and the step's
//! metrics, routing health per MoE layer included.
//!
//! Legend: N token slots of a micro-batch, K experts per token.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};
use lockstep_model::metrics::{layer_health, route_agreement};
use lockstep_model::{Batch, LayerRoute, MoeCausalLm, Replay, ReplayWeights, RouteMode, RoutingPlan, ROUTE_FREE};

use crate::error::{Result, TrainError};
use crate::logprobs::token_logprobs;
use crate::loss::{rl_loss, LossConfig, LossInputs, RatioMode};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, StepStats};
use crate::parallel::{sum_over_ranks, DataParallel, Parallel};

/// Inference-time route of one MoE layer for every slot of a micro-batch.
#[derive(Debug, Clone)]
pub struct LayerReplay {
    /// [N·K] expert ids; a row of `ROUTE_FREE` routes freely (padding, missing rows)
    pub ids: Vec<u32>,
    /// [N·K] inference router probabilities of those experts, when the engine sent them
    pub probs: Option<Vec<f32>>,
}

/// One packed micro-batch with everything the loss needs, per slot (token-aligned).
#[derive(Debug, Clone)]
pub struct TrainBatch {
    pub batch: Batch,
    pub logp_infer: Vec<f32>,
    pub advantages: Vec<f32>,
    pub loss_mask: Vec<f32>,
    /// keyed by decoder layer index; empty when the samples came without routes
    pub routes: BTreeMap<usize, LayerReplay>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    pub loss: LossConfig,
    pub optimizer: AdamWConfig,
    /// Force the inference routes (R3); off = the trainer routes freely.
    pub replay: bool,
}

/// Routing health of one MoE layer over a step (all its micro-batches, on every rank).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerStepMetrics {
    /// token-weighted mean routing confidence
    pub confidence: f64,
    /// max_vio of the step's load (tokens per expert summed over the micro-batches and ranks):
    /// the imbalance the experts' owners see
    pub max_vio: f64,
    /// the largest max_vio of one rank's own load (equal to `max_vio` on one rank)
    pub max_vio_rank_max: f64,
    /// share of real (token, layer) routes that free routing would have chosen identically
    pub route_agreement: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub entropy: f64,
    pub kl: f64,
    /// max |logp_train − logp_infer| over the step's completion tokens (over ranks: the max)
    pub max_abs_logprob_diff: f64,
    pub extreme_fraction: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: f64,
    pub fallback_tokens: f64,
    pub mis_dropped: f64,
    pub layers: BTreeMap<usize, LayerStepMetrics>,
}

pub struct Trainer {
    pub model: MoeCausalLm,
    pub params: Vec<(String, Var)>,
    pub optimizer: AdamW,
    pub cfg: TrainerConfig,
    /// The ranks this trainer is spread over (`None`: one rank holds everything).
    pub parallel: Parallel,
}

/// Per MoE layer over a step: token-weighted sums of confidence and agreement, tokens, load.
#[derive(Debug, Clone, Default)]
struct LayerAcc {
    confidence: f64,
    agreement: f64,
    tokens: f64,
    load: Vec<f64>,
    /// max_vio of this rank's load, the maximum over the ranks after the reduction
    rank_max_vio: f64,
}

fn load_max_vio(load: &[f64]) -> f64 {
    lockstep_model::metrics::max_vio(&load.iter().map(|&x| x as usize).collect::<Vec<_>>())
}

fn vec_tensor(v: &[f32], dev: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), v.len(), dev)?)
}

impl Trainer {
    /// Take a model (f32) and make its parameters trainable.
    pub fn new(mut model: MoeCausalLm, cfg: TrainerConfig) -> Result<Self> {
        let mut params = Vec::new();
        model.map_params(|name, t| {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            params.push((name.to_string(), v.clone()));
            Ok(v.as_tensor().clone())
        })?;
        Ok(Self { model, params, optimizer: AdamW::new(cfg.optimizer)?, cfg, parallel: None })
    }

    /// Take a whole model (the same on every rank), keep this rank's experts and train over the
    /// ranks of `dp` (see [`crate::parallel`]).
    pub fn new_parallel(mut model: MoeCausalLm, cfg: TrainerConfig, dp: std::sync::Arc<dyn DataParallel>) -> Result<Self> {
        dp.shard_model(&mut model)?;
        let mut t = Self::new(model, cfg)?;
        t.parallel = Some(dp);
        Ok(t)
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
            routes: BTreeMap::new(),
        })
    }

    /// Clip and update: against the local gradient norm, or (over ranks) after the replicated
    /// gradients are summed, against the global norm.
    fn apply(&mut self, acc: &mut GradAccumulator) -> Result<StepStats> {
        match &self.parallel {
            None => self.optimizer.apply(&self.params, acc),
            Some(dp) => {
                let norm = dp.reduce_grads(&self.params, acc)?;
                self.optimizer.apply_with_grad_norm(&self.params, acc, norm)
            }
        }
    }

    fn plan(&self, tb: &TrainBatch) -> Result<RoutingPlan> {
        if !self.cfg.replay || tb.routes.is_empty() {
            return Ok(RoutingPlan::record());
        }
        let n = tb.batch.num_slots();
        let k = self.model.cfg.moe.router.top_k;
        let mut plan = RoutingPlan::record();
        for (&l, r) in &tb.routes {
            if r.ids.len() != n * k {
                return Err(TrainError::input(&format!("routes[{l}].ids"), format!("{} ids for {n} slots x top-{k}", r.ids.len())));
            }
            let ids = Tensor::from_vec(r.ids.clone(), (n, k), self.model.device())?;
            plan = plan.with_layer(l, RouteMode::Replay(Replay::top_k(ids, ReplayWeights::Recompute)));
        }
        Ok(plan)
    }

    /// Forward + loss + backward of one micro-batch; gradients go into `acc`.
    fn micro_step(&self, tb: &TrainBatch, denominator: f64, acc: &mut GradAccumulator, m: &mut StepMetrics, layer_acc: &mut BTreeMap<usize, LayerAcc>) -> Result<()> {
        let dev = self.model.device().clone();
        let n = tb.batch.num_slots();
        for (name, v) in [("logp_infer", &tb.logp_infer), ("advantages", &tb.advantages), ("loss_mask", &tb.loss_mask)] {
            if v.len() != n {
                return Err(TrainError::input(name, format!("{} values for {n} slots", v.len())));
            }
        }
        let out = self.model.forward(&tb.batch, &self.plan(tb)?)?;
        let (logp_BT, valid) = token_logprobs(&out.logits, &tb.batch)?;
        let mask: Vec<f32> = tb.loss_mask.iter().zip(&valid).map(|(&m, &v)| if v { m } else { 0.0 }).collect();
        let k = self.model.cfg.moe.router.top_k;
        let (mut router_train, mut router_infer) = (Vec::new(), Vec::new());
        let mut available = vec![1f32; n];
        if matches!(self.cfg.loss.ratio, RatioMode::Joint(_)) {
            if tb.routes.is_empty() {
                available.iter_mut().for_each(|a| *a = 0.0);
            }
            for (l, r) in &tb.routes {
                let route = &out.routes[l];
                router_train.push(route.probs_NK()?.log()?.sum(1)?);
                let mut inf = vec![0f32; n];
                match &r.probs {
                    Some(p) if p.len() == n * k => {
                        for s in 0..n {
                            // free rows, and rows whose probabilities were not sent (0), fall back
                            if r.ids[s * k] == ROUTE_FREE || p[s * k..(s + 1) * k].iter().any(|&x| x <= 0.0) {
                                available[s] = 0.0;
                            } else {
                                inf[s] = p[s * k..(s + 1) * k].iter().map(|x| x.ln()).sum();
                            }
                        }
                    }
                    Some(p) => return Err(TrainError::input(&format!("routes[{l}].probs"), format!("{} values for {n} slots x top-{k}", p.len()))),
                    None => available.iter_mut().for_each(|a| *a = 0.0),
                }
                router_infer.push(vec_tensor(&inf, &dev)?);
            }
        }
        let inputs = LossInputs {
            logp_train: logp_BT.flatten_all()?,
            logp_infer: vec_tensor(&tb.logp_infer, &dev)?,
            advantages: vec_tensor(&tb.advantages, &dev)?,
            mask: vec_tensor(&mask, &dev)?,
            router_logp_train: router_train,
            router_logp_infer: router_infer,
            joint_available: Some(vec_tensor(&available, &dev)?),
        };
        let (loss, lm) = rl_loss(&self.cfg.loss, &inputs, denominator)?;
        acc.add(&self.params, &loss.backward()?)?;

        // metrics (weighted by tokens, divided at the end)
        let t = lm.tokens;
        m.loss += loss.to_scalar::<f32>()? as f64;
        m.kl += lm.kl * t;
        m.max_abs_logprob_diff = m.max_abs_logprob_diff.max(lm.max_abs_logprob_diff);
        m.extreme_fraction += lm.extreme_fraction * t;
        m.clip_fraction += lm.clip_fraction * t;
        m.tokens += t;
        m.fallback_tokens += lm.fallback_tokens;
        m.mis_dropped += lm.mis_dropped;
        let logits = out.logits.detach();
        let logsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ent_BT = (logsm.exp()? * &logsm)?.sum(D::Minus1)?.neg()?;
        // entropy of the distribution that predicted slot s sits at s − 1
        let ent: Vec<f32> = ent_BT.flatten_all()?.to_vec1()?;
        let (_, tt) = tb.batch.dims();
        for s in 0..n {
            if mask[s] > 0.0 && s % tt > 0 {
                m.entropy += ent[s - 1] as f64;
            }
        }
        let real = tb.batch.real_mask();
        let score = self.model.cfg.moe.router.score_function;
        for (&l, route) in &out.routes {
            let h = layer_health(route, &real, score)?;
            let agree = self.free_agreement(l, route, &real)?;
            let e = layer_acc.entry(l).or_default();
            let w = h.tokens as f64;
            e.confidence += h.confidence * w;
            e.agreement += agree * w;
            e.tokens += w;
            e.load.resize(h.load.len(), 0.0);
            for (a, &x) in e.load.iter_mut().zip(&h.load) {
                *a += x as f64;
            }
        }
        Ok(())
    }

    /// Share of routes free routing would have kept, given the live router scores.
    fn free_agreement(&self, layer: usize, route: &LayerRoute, real: &[bool]) -> Result<f64> {
        let block = self.model.moe_block(layer).expect("recorded layers are MoE layers");
        let ids = block.router.free_top_k(&route.scores_NE)?;
        let free = LayerRoute {
            top_k: route.top_k,
            expert_A: ids.flatten_all()?,
            ..route.clone()
        };
        Ok(route_agreement(route, &free, real)?)
    }

    /// One optimizer step over the micro-batches of a step (this rank's share of the global
    /// batch when the trainer is parallel).
    pub fn step(&mut self, micro: &[TrainBatch]) -> Result<StepMetrics> {
        let (denominator, rounds) = self.rounds(loss_tokens(micro), micro.len())?;
        if denominator == 0.0 {
            return Err(TrainError::input("loss_mask", "no completion tokens in the step"));
        }
        let mut acc = GradAccumulator::default();
        let mut m = StepMetrics::default();
        let mut layer_acc = BTreeMap::new();
        let empty = if rounds > micro.len() { Some(self.empty_batch()?) } else { None };
        for i in 0..rounds {
            match (micro.get(i), &empty) {
                (Some(tb), _) => self.micro_step(tb, denominator, &mut acc, &mut m, &mut layer_acc)?,
                // metrics of an empty round are dropped
                (None, Some(tb)) => self.micro_step(tb, denominator, &mut acc, &mut StepMetrics::default(), &mut BTreeMap::new())?,
                (None, None) => unreachable!("an empty batch pads the missing rounds"),
            }
        }
        let stats = self.apply(&mut acc)?;
        self.reduce_metrics(&mut m, &mut layer_acc)?;
        let per = |x: f64| if m.tokens > 0.0 { x / m.tokens } else { 0.0 };
        m.kl = per(m.kl);
        m.extreme_fraction = per(m.extreme_fraction);
        m.clip_fraction = per(m.clip_fraction);
        m.entropy = per(m.entropy);
        m.grad_norm = stats.grad_norm;
        m.lr = stats.lr;
        m.step = self.optimizer.step;
        m.layers = layer_acc
            .into_iter()
            .map(|(l, a)| {
                let d = if a.tokens > 0.0 { a.tokens } else { 1.0 };
                let max_vio = load_max_vio(&a.load);
                let rank_max = if self.parallel.is_some() { a.rank_max_vio } else { max_vio };
                (l, LayerStepMetrics { confidence: a.confidence / d, max_vio, max_vio_rank_max: rank_max, route_agreement: a.agreement / d })
            })
            .collect();
        Ok(m)
    }

    /// Over ranks: sum the step's metric sums and every layer's sums and load.
    fn reduce_metrics(&self, m: &mut StepMetrics, layer_acc: &mut BTreeMap<usize, LayerAcc>) -> Result<()> {
        let Some(dp) = &self.parallel else { return Ok(()) };
        let e = self.model.cfg.moe.router.num_experts;
        let mut v = vec![m.loss, m.kl, m.extreme_fraction, m.clip_fraction, m.entropy, m.tokens, m.fallback_tokens, m.mis_dropped];
        // every rank lists the same layers (a rank may have seen none of them)
        let layers = self.model.cfg.moe_layers.clone();
        for l in &layers {
            let a = layer_acc.entry(*l).or_default();
            a.load.resize(e, 0.0);
            v.extend([a.confidence, a.agreement, a.tokens]);
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
        let mut at = 8;
        for l in &layers {
            let a = layer_acc.get_mut(l).expect("inserted above");
            (a.confidence, a.agreement, a.tokens) = (sum[at], sum[at + 1], sum[at + 2]);
            a.load = sum[at + 3..at + 3 + e].to_vec();
            at += 3 + e;
        }
        for (l, m) in layers.iter().zip(rank_max) {
            layer_acc.get_mut(l).expect("inserted above").rank_max_vio = m;
        }
        Ok(())
    }
}

/// Loss tokens of a step: masked slots that have a prediction (not a sequence's first token).
fn loss_tokens(micro: &[TrainBatch]) -> f64 {
    micro
        .iter()
        .map(|tb| {
            let valid = token_valid(&tb.batch);
            tb.loss_mask.iter().zip(&valid).filter(|(&m, &v)| m > 0.0 && v).count() as f64
        })
        .sum()
}

fn token_valid(batch: &Batch) -> Vec<bool> {
    let seg = batch.segments();
    let (b, t) = batch.dims();
    (0..b * t).map(|s| s % t > 0 && seg[s] != 0 && seg[s] == seg[s - 1]).collect()
}

impl TrainBatch {
    /// From a micro-batch of the route-transport packer: `[token][layer][k]` rows become per
    /// layer `[N·K]` rows; free rows (padding, missing, samples without routes) stay
    /// `ROUTE_FREE` and route freely.
    pub fn from_micro_batch(mb: &lockstep_trace::pack::MicroBatch, device: &candle_core::Device) -> Result<Self> {
        let n = mb.len();
        let cu: Vec<usize> = mb.cu_seqlens.iter().map(|&c| c as usize).collect();
        let batch = Batch::packed(&mb.tokens, Some(&mb.position_ids), &cu, device)?;
        let (nl, k) = (mb.layers.len(), mb.top_k);
        let mut routes = BTreeMap::new();
        for (li, &layer) in mb.layers.iter().enumerate() {
            let mut ids = Vec::with_capacity(n * k);
            let mut probs = mb.route_probs.as_ref().map(|_| Vec::with_capacity(n * k));
            for t in 0..n {
                let a = (t * nl + li) * k;
                ids.extend_from_slice(&mb.route_ids[a..a + k]);
                if let (Some(p), Some(src)) = (probs.as_mut(), mb.route_probs.as_ref()) {
                    p.extend_from_slice(&src[a..a + k]);
                }
            }
            routes.insert(layer as usize, LayerReplay { ids, probs });
        }
        Ok(TrainBatch {
            batch,
            logp_infer: mb.logprobs.clone(),
            advantages: mb.advantages.clone(),
            loss_mask: mb.loss_mask.iter().map(|&m| f32::from(u8::from(m))).collect(),
            routes,
        })
    }
}

impl Trainer {
    /// One supervised step (warm-up): loss = −Σ mask · log π(y) / Σ mask over the
    /// micro-batches (cross-entropy on the masked tokens), free routing, AdamW. Returns the loss.
    pub fn sft_step(&mut self, micro: &[TrainBatch]) -> Result<f64> {
        let (denominator, rounds) = self.rounds(loss_tokens(micro), micro.len())?;
        if denominator == 0.0 {
            return Err(TrainError::input("loss_mask", "no supervised tokens in the step"));
        }
        let mut acc = GradAccumulator::default();
        let mut total = 0.0;
        let empty = if rounds > micro.len() { Some(self.empty_batch()?) } else { None };
        for i in 0..rounds {
            let tb = micro.get(i).or(empty.as_ref()).expect("an empty batch pads the missing rounds");
            let out = self.model.forward(&tb.batch, &RoutingPlan::compute())?;
            let (logp, valid) = token_logprobs(&out.logits, &tb.batch)?;
            let mask: Vec<f32> = tb.loss_mask.iter().zip(&valid).map(|(&m, &v)| if v { m } else { 0.0 }).collect();
            let mask = vec_tensor(&mask, self.model.device())?;
            let loss = ((logp.flatten_all()? * mask)?.sum_all()?.neg()? / denominator)?;
            total += loss.to_scalar::<f32>()? as f64;
            acc.add(&self.params, &loss.backward()?)?;
        }
        self.apply(&mut acc)?;
        match &self.parallel {
            Some(dp) => Ok(sum_over_ranks(dp.as_ref(), &[total])?[0]),
            None => Ok(total),
        }
    }

    /// A copy of the model for inference: same weights (shared storage, so it follows later
    /// updates without copying), no autograd tracking.
    pub fn inference_model(&self) -> Result<MoeCausalLm> {
        let mut m = self.model.clone();
        m.map_params(|_, t| Ok(t.detach()))?;
        Ok(m)
    }
}

/// Routes of a recording as inference-time routes (what an engine would send): ids and probs.
pub fn replay_from_recording(rec: &lockstep_model::Recording) -> Result<BTreeMap<usize, LayerReplay>> {
    rec.iter()
        .map(|(&l, r)| {
            let ids: Vec<u32> = r.expert_A.to_vec1()?;
            let probs: Vec<f32> = r.prob_A.to_dtype(DType::F32)?.to_vec1()?;
            Ok((l, LayerReplay { ids, probs: Some(probs) }))
        })
        .collect()
}

