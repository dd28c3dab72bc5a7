//! The trainer's forward and backward in stages — embeddings, each decoder layer, the head —
//! so that a micro-batch holds at most one decoder layer's autograd graph with activation
//! checkpointing on, and never a [tokens, vocab] tensor for a whole micro-batch.
//!
//! Forward: x₀ = embed(ids); x_{l+1} = layer_l(x_l), every layer's input kept as a leaf `Var`.
//! Without checkpointing each layer's graph is kept; with it the graph is dropped. The head runs
//! in chunks of C positions: logits [C, V] → the log-probability of the next token and the
//! entropy at each position, without gradient.
//!
//! Backward, each stage through a surrogate Σ y · ∂L/∂y (whose gradient at y is ∂L/∂y exactly):
//! 1. the loss, from leaves (slot log-probabilities, entropies, each replayed layer's router
//!    scores) → their gradients;
//! 2. the head, chunk by chunk: the chunk's logits recomputed from the last layer's output rows,
//!    then log-softmax, target gather and entropy with their backward in one fused op
//!    (`lockstep_model::head_grad`, no f32 [C, V] intermediates) → ∂L/∂(final norm, LM head)
//!    and ∂L/∂x_L of those rows;
//! 3. each layer from the last: its kept graph, or with checkpointing its forward recomputed —
//!    the same ops on the same input under the same routing plan, so bitwise the first forward,
//!    replayed routes included — → ∂L/∂(layer weights) and ∂L/∂x_l;
//! 4. the embeddings.
//!
//! Every stage's parameter gradients go into the step's [`GradAccumulator`]. Checkpointing
//! changes what is kept, not the arithmetic: the gradients are bitwise the same with it and
//! without. The chunked log-probabilities are the unchunked ones bit for bit wherever the head's
//! rows do not depend on how many rows one product holds (the batch-invariant kernels).
//!
//! Legend: B rows, T slots per row, N = B·T positions (slots), D hidden, V vocab, C chunk rows,
//! E experts.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};
use lockstep_model::head_grad::{logprob_entropy_surrogate, token_stats};
use lockstep_model::logprobs::next_token_targets as targets;
use lockstep_model::{Batch, ForwardContext, LayerRoute, MoeCausalLm, Recording, RoutingPlan};

use crate::error::{Result, TrainError};
use crate::optim::GradAccumulator;
use crate::phases::PhaseTimer;

/// How a micro-batch is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageOptions {
    /// Drop each decoder layer's graph after its forward and recompute it in the backward.
    pub checkpoint: bool,
    /// Positions per head chunk (0: the whole micro-batch at once).
    pub chunk_tokens: usize,
    /// Sampling temperature of the log-probabilities and entropies.
    pub temperature: f64,
}

/// What the loss stage may take gradients of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradTargets {
    /// the entropies (entropy bonus)
    pub entropy: bool,
    /// the replayed layers' router scores (joint ratio)
    pub router_scores: bool,
}

impl GradTargets {
    /// Only the log-probabilities take gradients (or nothing does: scoring).
    pub fn none() -> Self {
        Self { entropy: false, router_scores: false }
    }
}

/// One micro-batch's staged forward ([module doc](self)).
pub struct Staged<'a> {
    model: &'a MoeCausalLm,
    batch: &'a Batch,
    plan: &'a RoutingPlan,
    ctx: ForwardContext,
    opts: StageOptions,
    /// input of each layer (leaf Vars when training), then the last layer's output
    xs: Vec<Tensor>,
    /// per layer, when kept: its output and its router scores, with their graphs
    kept: Vec<Option<(Tensor, Option<Tensor>)>>,
    /// per replayed / recorded MoE layer: the route applied, detached; its `scores_NE` is a
    /// leaf when the router scores take gradients
    pub routes: Recording,
    /// [N] per slot: log π(token at n | prefix), 0 where invalid (a leaf when training)
    pub logp: Tensor,
    /// [N] per slot: entropy of the distribution that predicted slot n, 0 where invalid
    pub entropy: Tensor,
    /// per slot: its previous slot lies in the same sequence
    pub valid: Vec<bool>,
    /// the positions the head ran at (ascending): every p whose next slot p + 1 is valid and
    /// scored; row m of the head's [M, ..] tensors is position `head_rows[m]`
    head_rows: Vec<u32>,
    train: bool,
}

/// A route with every tensor detached from its graph.
fn detached(r: &LayerRoute) -> LayerRoute {
    LayerRoute {
        num_tokens: r.num_tokens,
        top_k: r.top_k,
        token_A: r.token_A.detach(),
        expert_A: r.expert_A.detach(),
        prob_A: r.prob_A.detach(),
        weight_A: r.weight_A.detach(),
        scores_NE: r.scores_NE.detach(),
        logits_NE: r.logits_NE.detach(),
    }
}

fn leaf(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t.detach())?.as_tensor().clone())
}

/// Slot n takes head row `row_of[n]`'s value where it has one, else 0 (a `where`, never a
/// product, so a −inf log-probability at an invalid position stays out).
fn to_slots(x_M: &Tensor, row_of: &[Option<u32>]) -> Result<Tensor> {
    let dev = x_M.device();
    let idx: Vec<u32> = row_of.iter().map(|r| r.unwrap_or(0)).collect();
    let mask: Vec<u8> = row_of.iter().map(|r| u8::from(r.is_some())).collect();
    let picked = x_M.index_select(&Tensor::from_vec(idx, row_of.len(), dev)?, 0)?;
    Ok(Tensor::from_vec(mask, row_of.len(), dev)?.where_cond(&picked, &picked.zeros_like()?)?)
}

/// Per head row m: slot `head_rows[m] + 1`'s value — a slot gradient moved to the row that
/// predicted it.
fn to_rows(g_N: &Tensor, head_rows: &[u32]) -> Result<Tensor> {
    let idx: Vec<u32> = head_rows.iter().map(|&p| p + 1).collect();
    Ok(g_N.index_select(&Tensor::from_vec(idx, head_rows.len(), g_N.device())?, 0)?)
}

/// The head's positions (`Staged::head_rows`) and, per slot, the head row that scores it.
/// `scored` (per slot, None: every slot) picks the slots whose log-probability is wanted.
fn head_rows_of(has: &[bool], scored: Option<&[bool]>) -> (Vec<u32>, Vec<Option<u32>>) {
    let n = has.len();
    let mut rows = Vec::with_capacity(n);
    let mut row_of = vec![None; n];
    for (p, &h) in has.iter().enumerate() {
        if h && scored.is_none_or(|s| s[p + 1]) {
            row_of[p + 1] = Some(rows.len() as u32);
            rows.push(p as u32);
        }
    }
    (rows, row_of)
}

/// Head of rows x [C, D] in the forward: per row the log-probability of its target and its
/// entropy, [C] f32 — by `token_stats` on the logits in the model's dtype (it widens each one to
/// f32 exactly, so bf16 logits give the bits of their f32 copy), the op the engine records its
/// log-probabilities with (the same bits).
fn head_rows(model: &MoeCausalLm, x_CD: &Tensor, target_C: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let logits = model.head_forward(x_CD)?;
    let stats_C3 = token_stats(&logits, target_C, temperature)?;
    Ok((stats_C3.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?, stats_C3.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?))
}

/// Σ x·g as a scalar with x's graph: the surrogate whose gradient at x is g exactly. Summed over
/// the last dimension first, then over the rest (candle's CUDA reduction of a whole tensor runs
/// in one thread block; the two stages give the same gradient).
fn surrogate(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let p = (x * g.to_dtype(x.dtype())?)?;
    let p = if p.rank() > 1 { p.sum(D::Minus1)? } else { p };
    Ok(p.sum_all()?.to_dtype(DType::F32)?)
}

/// The head's input rows [M, D]: the last layer's output x [B, T, D] at `rows` (all N of them:
/// the whole tensor, no copy).
fn head_input(x_BTD: &Tensor, rows: &[u32], n: usize, d: usize) -> Result<Tensor> {
    let x_ND = x_BTD.detach().reshape((n, d))?;
    if rows.len() == n {
        return Ok(x_ND);
    }
    Ok(x_ND.index_select(&Tensor::from_vec(rows.to_vec(), rows.len(), x_ND.device())?, 0)?)
}

/// The positions [a, b) of each head chunk.
fn chunks(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    let size = if size == 0 { n.max(1) } else { size };
    (0..n.div_ceil(size)).map(move |c| (c * size, ((c + 1) * size).min(n)))
}

impl<'a> Staged<'a> {
    /// The forward of `batch` under `plan`, every valid slot scored. `train`: leaves and
    /// (without checkpointing) graphs are kept for [`Staged::backward`]; otherwise nothing is
    /// (scoring, the reference).
    pub fn forward(model: &'a MoeCausalLm, batch: &'a Batch, plan: &'a RoutingPlan, opts: StageOptions, train: bool, targets_: GradTargets) -> Result<Self> {
        Self::forward_scored(model, batch, plan, opts, train, targets_, None)
    }

    /// [`Staged::forward`] with the head run only where a slot is `scored` (per slot; None:
    /// every slot): the positions whose next token the loss weighs, not the prompt's. The
    /// log-probability and entropy of every other slot are 0 and take no gradient. Under the
    /// batch-invariant kernels a scored slot's values are bitwise those of the full head.
    pub fn forward_scored(model: &'a MoeCausalLm, batch: &'a Batch, plan: &'a RoutingPlan, opts: StageOptions, train: bool, targets_: GradTargets, scored: Option<&[bool]>) -> Result<Self> {
        let (b, t) = batch.dims();
        if let Some(s) = scored {
            if s.len() != b * t {
                return Err(TrainError::input("loss_mask", format!("{} scored flags for {} slots", s.len(), b * t)));
            }
        }
        let ctx = model.prepare(batch, plan)?;
        let (b, t) = batch.dims();
        let n = b * t;
        let mut x = model.embed(batch)?.detach();
        let layers = model.layers.len();
        let (mut xs, mut kept) = (Vec::with_capacity(layers + 1), Vec::with_capacity(layers));
        let mut routes = Recording::new();
        for l in 0..layers {
            let x_in = if train { leaf(&x)? } else { x };
            let mut rec = Recording::new();
            let y = model.layer_forward(l, &x_in, &ctx, plan, batch, &mut rec)?;
            let scores = rec.get(&l).map(|r| r.scores_NE.clone());
            if let Some(r) = rec.get(&l) {
                let mut d = detached(r);
                if train && targets_.router_scores {
                    d.scores_NE = leaf(&r.scores_NE)?;
                }
                routes.insert(l, d);
            }
            x = y.detach();
            kept.push(if train && !opts.checkpoint { Some((y, scores)) } else { None });
            xs.push(x_in);
        }
        let last = if train { leaf(&x)? } else { x };
        xs.push(last);
        let (target, has, valid) = targets(batch)?;
        let (rows, row_of) = head_rows_of(&has, scored);
        let dev = model.device();
        let m = rows.len();
        let x_MD = head_input(&xs[layers], &rows, n, model.cfg.hidden_size)?;
        let target = Tensor::from_vec(rows.iter().map(|&p| target[p as usize]).collect::<Vec<u32>>(), m, dev)?;
        let (mut lps, mut hs) = (Vec::new(), Vec::new());
        for (a, b) in chunks(m, opts.chunk_tokens) {
            let (lp, h) = head_rows(model, &x_MD.narrow(0, a, b - a)?, &target.narrow(0, a, b - a)?, opts.temperature)?;
            lps.push(lp.detach());
            hs.push(h.detach());
        }
        let (mut logp, mut entropy) = if m == 0 {
            (Tensor::zeros(n, DType::F32, dev)?, Tensor::zeros(n, DType::F32, dev)?)
        } else {
            (to_slots(&Tensor::cat(&lps, 0)?, &row_of)?, to_slots(&Tensor::cat(&hs, 0)?, &row_of)?)
        };
        if train {
            logp = leaf(&logp)?;
            if targets_.entropy {
                entropy = leaf(&entropy)?;
            }
        }
        Ok(Self { model, batch, plan, ctx, opts, xs, kept, routes, logp, entropy, valid, head_rows: rows, train })
    }

    /// Backward of `loss` (a scalar built from [`Staged::logp`], [`Staged::entropy`] and the
    /// router scores in [`Staged::routes`]) through every stage into `acc`.
    pub fn backward(self, loss: &Tensor, params: &[(String, Var)], acc: &mut GradAccumulator) -> Result<()> {
        self.backward_timed(loss, params, acc, &mut PhaseTimer::off())
    }

    /// [`Staged::backward`] with its stages timed: `backward_loss`, `backward_head`,
    /// `backward_layers` (recompute included), `backward_embed`.
    pub fn backward_timed(mut self, loss: &Tensor, params: &[(String, Var)], acc: &mut GradAccumulator, timer: &mut PhaseTimer) -> Result<()> {
        if !self.train {
            return Err(TrainError::input("backward", "a staged forward made without train has no graph"));
        }
        let model = self.model;
        let g = loss.backward()?;
        acc.add(params, &g)?;
        let grad_or_zero = |t: &Tensor| -> Result<Tensor> {
            match g.get(t) {
                Some(x) => Ok(x.detach()),
                None => Ok(t.zeros_like()?.detach()),
            }
        };
        let rows = std::mem::take(&mut self.head_rows);
        let g_lp = to_rows(&grad_or_zero(&self.logp)?, &rows)?;
        let g_h = match g.get(&self.entropy) {
            Some(x) => Some(to_rows(&x.detach(), &rows)?),
            None => None,
        };
        let mut g_scores: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (&l, r) in &self.routes {
            if let Some(x) = g.get(&r.scores_NE) {
                g_scores.insert(l, x.detach());
            }
        }
        drop(g);
        timer.mark("backward_loss")?;
        // 2. the head, chunk by chunk
        let (b, t) = self.batch.dims();
        let (n, d) = (b * t, model.cfg.hidden_size);
        let layers = model.layers.len();
        let m = rows.len();
        let x_MD = head_input(&self.xs[layers], &rows, n, d)?;
        // the targets stay on the host: the fused op checks them there, no copy back
        let (target, _, _) = targets(self.batch)?;
        let target: Vec<u32> = rows.iter().map(|&p| target[p as usize]).collect();
        let mut g_x_parts = Vec::new();
        for (a, b) in chunks(m, self.opts.chunk_tokens) {
            if a == b {
                continue;
            }
            let x_c = leaf(&x_MD.narrow(0, a, b - a)?)?;
            // the logits recomputed with their graph; log-softmax, gather and entropy and their
            // backward in one op (`head_grad`): Σ lp·g_lp + h·g_h, ∂/∂logits in one pass
            let logits = model.head_forward(&x_c)?;
            let g_h_c = g_h.as_ref().map(|g| g.narrow(0, a, b - a)).transpose()?;
            let s = logprob_entropy_surrogate(&logits, &target[a..b], &g_lp.narrow(0, a, b - a)?, g_h_c.as_ref(), self.opts.temperature)?.sum_all()?;
            let gs = s.backward()?;
            acc.add(params, &gs)?;
            g_x_parts.push(match gs.get(&x_c) {
                Some(x) => x.detach(),
                None => x_c.zeros_like()?.detach(),
            });
        }
        let g_x_ND = if m == n {
            Tensor::cat(&g_x_parts, 0)?
        } else {
            let zeros = Tensor::zeros((n, d), self.xs[layers].dtype(), model.device())?;
            if m == 0 {
                zeros
            } else {
                let idx = Tensor::from_vec(rows.clone(), m, model.device())?;
                zeros.index_add(&idx, &Tensor::cat(&g_x_parts, 0)?, 0)?
            }
        };
        let mut g_x = g_x_ND.reshape((b, t, d))?;
        timer.mark("backward_head")?;
        // 3. the layers, from the last
        for l in (0..layers).rev() {
            let (y, scores) = match self.kept[l].take() {
                Some(k) => k,
                None => {
                    let mut rec = Recording::new();
                    let y = model.layer_forward(l, &self.xs[l], &self.ctx, self.plan, self.batch, &mut rec)?;
                    (y, rec.get(&l).map(|r| r.scores_NE.clone()))
                }
            };
            let mut s = surrogate(&y, &g_x)?;
            if let (Some(sc), Some(gs)) = (scores, g_scores.get(&l)) {
                s = (s + surrogate(&sc, gs)?)?;
            }
            let gs = s.backward()?;
            acc.add(params, &gs)?;
            g_x = match gs.get(&self.xs[l]) {
                Some(x) => x.detach(),
                None => self.xs[l].zeros_like()?.detach(),
            };
        }
        timer.mark("backward_layers")?;
        // 4. the embeddings
        let x0 = model.embed(self.batch)?;
        let s = surrogate(&x0, &g_x)?;
        acc.add(params, &s.backward()?)?;
        timer.mark("backward_embed")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::{Trainer, TrainerConfig};
    use candle_core::Device;
    use lockstep_model::logprobs::at_temperature;

    /// The staged backward with the entropy term at T = 0.7 (the fused head op's g_h path)
    /// against candle's whole-graph backward of the same loss, within f32 rounding.
    #[test]
    fn entropy_gradients_at_temperature_equal_the_whole_graph() {
        let dev = Device::Cpu;
        let model = MoeCausalLm::embedded_default(5, DType::F32, &dev).unwrap();
        let t = Trainer::new(model, TrainerConfig::default()).unwrap();
        let tokens: Vec<u32> = (0..13).map(|i| (i * 11 + 5) % 256).chain((0..9).map(|i| (i * 29 + 7) % 256)).collect();
        let batch = Batch::packed(&tokens, None, &[0, 13, 22], &dev).unwrap();
        let plan = RoutingPlan::compute();
        let n = tokens.len();
        let wl = Tensor::from_vec((0..n).map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.6).collect::<Vec<f32>>(), n, &dev).unwrap();
        let wh = Tensor::from_vec((0..n).map(|i| ((i * 3) % 4) as f32 * 0.2 - 0.3).collect::<Vec<f32>>(), n, &dev).unwrap();
        let temp = 0.7;
        // whole graph
        let logits = t.model.forward(&batch, &plan).unwrap().logits.reshape((n, t.model.cfg.vocab_size)).unwrap();
        let logsm = candle_nn::ops::log_softmax(&at_temperature(&logits, temp).unwrap(), D::Minus1).unwrap();
        let (target, _, valid) = targets(&batch).unwrap();
        let lp = logsm.gather(&Tensor::from_vec(target, (n, 1), &dev).unwrap(), 1).unwrap().squeeze(1).unwrap();
        let h = (logsm.exp().unwrap() * &logsm).unwrap().sum(D::Minus1).unwrap().neg().unwrap();
        let row_of: Vec<Option<u32>> = valid.iter().enumerate().map(|(n, &v)| v.then(|| n as u32 - 1)).collect();
        let (lp, h) = (to_slots(&lp, &row_of).unwrap(), to_slots(&h, &row_of).unwrap());
        let loss = ((lp * &wl).unwrap().sum_all().unwrap() + (h * &wh).unwrap().sum_all().unwrap()).unwrap();
        let mut whole = GradAccumulator::default();
        whole.add(&t.params, &loss.backward().unwrap()).unwrap();
        // staged, checkpointed, chunked
        let opts = StageOptions { checkpoint: true, chunk_tokens: 5, temperature: temp };
        let s = Staged::forward(&t.model, &batch, &plan, opts, true, GradTargets { entropy: true, router_scores: false }).unwrap();
        let loss2 = ((&s.logp * &wl).unwrap().sum_all().unwrap() + (&s.entropy * &wh).unwrap().sum_all().unwrap()).unwrap();
        let (a, b) = (loss.to_scalar::<f32>().unwrap(), loss2.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
        let mut staged = GradAccumulator::default();
        s.backward(&loss2, &t.params, &mut staged).unwrap();
        let mut compared = 0;
        for (name, _) in &t.params {
            let (Some(a), Some(b)) = (whole.get(name), staged.get(name)) else {
                assert!(whole.get(name).is_none() && staged.get(name).is_none(), "{name}: a gradient on one side only");
                continue;
            };
            let max = |x: &Tensor| x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let (scale, diff) = (max(a).max(1e-6), max(&(a - b).unwrap()));
            assert!(diff <= 1e-4 * scale, "{name}: max |Δ| {diff} (scale {scale})");
            compared += 1;
        }
        assert!(compared >= t.params.len() - 2, "{compared} of {} parameters compared", t.params.len());
    }
}
