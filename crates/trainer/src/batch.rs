//! What one packed micro-batch carries into a trainer step: tokens, the behaviour policy's
//! log-probabilities, advantages, the loss mask, the inference routes per MoE layer and —
//! once [`crate::trainer::Trainer::score`] ran — the old policy π_old.
//!
//! Every per-slot vector is indexed by token slot n of the packed batch: `logp_infer[n]` is
//! log π(y_n), the probability of the token *at* n (computed at position n − 1); route rows are
//! indexed by the position that *ran* them (row n = the experts of token n as input). The loss
//! pairs the token at n with the route row of n − 1 ([`crate::route_terms`]).
//!
//! The routes are the one route type after the model, a [`RouteTrace`] over the batch's slots.
//!
//! Legend: N token slots, W experts per route row (top-k for token choice, every expert for
//! expert choice over one-token pools).

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use lockstep_model::{Batch, Recording};
use lockstep_trace::{Probs, ProbDtype, RouteTrace, TraceMeta};

use crate::error::{Result, TrainError};

/// The old policy π_old of a micro-batch, as the trainer scored it before the first update
/// (`loss.pi_old = "recompute"`): token log-probabilities per slot and, per MoE layer, the
/// router probabilities at the replayed experts per position ([N·W], aligned with the routes).
#[derive(Debug, Clone, PartialEq)]
pub struct OldPolicy {
    pub logp: Vec<f32>,
    pub route_probs: BTreeMap<usize, Vec<f32>>,
}

/// One packed micro-batch with everything the loss needs, per slot (token-aligned).
#[derive(Debug, Clone)]
pub struct TrainBatch {
    pub batch: Batch,
    pub logp_infer: Vec<f32>,
    pub advantages: Vec<f32>,
    pub loss_mask: Vec<f32>,
    /// the inference routes of every slot (`[slot][layer][w]`, free rows missing); `None` when
    /// the samples came without routes
    pub routes: Option<RouteTrace>,
    /// π_old, set by [`crate::trainer::Trainer::score`]
    pub old: Option<OldPolicy>,
}

impl TrainBatch {
    /// A micro-batch; every per-slot vector must have one value per slot of `batch` and every
    /// route one row per slot.
    pub fn new(batch: Batch, logp_infer: Vec<f32>, advantages: Vec<f32>, loss_mask: Vec<f32>, routes: Option<RouteTrace>) -> Result<Self> {
        let tb = Self { batch, logp_infer, advantages, loss_mask, routes, old: None };
        tb.check()?;
        Ok(tb)
    }

    /// Lengths agree with the batch (also checked before every step: fields are public).
    pub fn check(&self) -> Result<()> {
        let n = self.batch.num_slots();
        for (name, v) in [("logp_infer", &self.logp_infer), ("advantages", &self.advantages), ("loss_mask", &self.loss_mask)] {
            if v.len() != n {
                return Err(TrainError::input(name, format!("{} values for {n} slots", v.len())));
            }
        }
        if let Some(r) = &self.routes {
            if r.num_tokens() != n {
                return Err(TrainError::input("routes", format!("{} route rows for {n} slots", r.num_tokens())));
            }
            if r.top_k().is_none() {
                return Err(TrainError::input("routes", "variable-width route rows: the trainer replays fixed-width rows (top-k, or every expert for block:1 expert choice)"));
            }
        }
        if let Some(o) = &self.old {
            if o.logp.len() != n {
                return Err(TrainError::input("old.logp", format!("{} values for {n} slots", o.logp.len())));
            }
        }
        Ok(())
    }

    /// From a micro-batch of the route-transport packer: its route trace is passed on as is.
    pub fn from_micro_batch(mb: &lockstep_trace::pack::MicroBatch, device: &Device) -> Result<Self> {
        let cu: Vec<usize> = mb.cu_seqlens.iter().map(|&c| c as usize).collect();
        let batch = Batch::packed(&mb.tokens, Some(&mb.position_ids), &cu, device)?;
        Self::new(batch, mb.logprobs.clone(), mb.advantages.clone(), mb.loss_mask.iter().map(|&m| f32::from(u8::from(m))).collect(), mb.routes.clone())
    }

    /// The decoder layers of the routes, in trace order.
    pub fn route_layers(&self) -> Vec<usize> {
        self.routes.as_ref().map(|r| r.layers().iter().map(|&l| l as usize).collect()).unwrap_or_default()
    }

    /// Per slot: whether the slot has a prediction (its previous slot is in the same sequence).
    pub fn valid(&self) -> Vec<bool> {
        token_valid(&self.batch)
    }

    /// Loss tokens: masked slots that have a prediction (not a sequence's first token).
    pub fn loss_tokens(&self) -> f64 {
        self.loss_mask.iter().zip(&self.valid()).filter(|(&m, &v)| m > 0.0 && v).count() as f64
    }
}

/// Slot n has a prediction iff slot n − 1 is in the same sequence (same row).
pub(crate) fn token_valid(batch: &Batch) -> Vec<bool> {
    let seg = batch.segments();
    let (b, t) = batch.dims();
    (0..b * t).map(|s| s % t > 0 && seg[s] != 0 && seg[s] == seg[s - 1]).collect()
}

/// The routes of a recording as an engine would send them: a route trace over the batch's
/// slots (token-major rows of ids and router probabilities; expert choice: each token's experts
/// in expert order, every token the same number).
pub fn replay_from_recording(rec: &Recording) -> Result<Option<RouteTrace>> {
    let Some(first) = rec.values().next() else { return Ok(None) };
    let n = first.num_tokens;
    let e = first.scores_NE.dims2()?.1;
    let mut per_layer: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
    let mut width = None;
    for (&l, r) in rec {
        let ids: Vec<u32> = r.expert_A.to_vec1()?;
        let probs: Vec<f32> = r.prob_A.to_dtype(DType::F32)?.to_vec1()?;
        let (ids, probs, w) = match r.top_k {
            Some(k) => (ids, probs, k),
            None => {
                let tok: Vec<u32> = r.token_A.to_vec1()?;
                let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
                for ((&t, &x), &p) in tok.iter().zip(&ids).zip(&probs) {
                    rows[t as usize].push((x, p));
                }
                let w = rows.iter().map(Vec::len).max().unwrap_or(0);
                if let Some((q, row)) = rows.iter().enumerate().find(|(_, row)| row.len() != w) {
                    return Err(TrainError::input(&format!("routes[{l}]"), format!("token slot {q} has {} experts, others {w}", row.len())));
                }
                rows.iter_mut().for_each(|row| row.sort_by_key(|&(x, _)| x));
                let (i, p): (Vec<u32>, Vec<f32>) = rows.into_iter().flatten().unzip();
                (i, p, w)
            }
        };
        if *width.get_or_insert(w) != w {
            return Err(TrainError::input(&format!("routes[{l}]"), "layers with different route widths"));
        }
        per_layer.push((ids, probs));
    }
    let w = width.unwrap_or(1);
    let (mut ids, mut probs) = (Vec::with_capacity(n * rec.len() * w), Vec::with_capacity(n * rec.len() * w));
    for t in 0..n {
        for (li, lp) in per_layer.iter().enumerate() {
            let _ = li;
            ids.extend_from_slice(&lp.0[t * w..(t + 1) * w]);
            probs.extend_from_slice(&lp.1[t * w..(t + 1) * w]);
        }
    }
    let layers = rec.keys().map(|&l| l as u32).collect();
    let meta = TraceMeta::top_k(e as u32, w as u32);
    let trace = RouteTrace::from_u32(meta, layers, n, &ids, vec![false; n], Some(Probs::from_f32(ProbDtype::F32, &probs)))
        .map_err(|e| TrainError::input("routes", e.to_string()))?;
    Ok(Some(trace))
}
