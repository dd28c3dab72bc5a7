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
/// router probabilities at the replayed experts (every real row's experts, token by token, as
/// `route_terms::RowIndex` lists them).
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

    /// Per slot: the loss weighs its token (`loss_mask` ≠ 0) — the slots the head must score
    /// ([`crate::staged::Staged::forward_scored`]); prompt slots are not.
    pub fn scored_slots(&self) -> Vec<bool> {
        self.loss_mask.iter().map(|&m| m != 0.0).collect()
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
/// slots (token-major rows of ids and router probabilities). Token choice: top-k rows in
/// selection order. Expert choice: each token's experts in expert order — fixed-width when
/// every token has the same number (one-token pools), else variable rows.
pub fn replay_from_recording(rec: &Recording) -> Result<Option<RouteTrace>> {
    let Some(first) = rec.values().next() else { return Ok(None) };
    let n = first.num_tokens;
    let e = first.scores_NE.dims2()?.1;
    // per layer, per token: (expert, prob) in row order
    let mut rows_LN: Vec<Vec<Vec<(u32, f32)>>> = Vec::new();
    for r in rec.values() {
        let ids: Vec<u32> = r.expert_A.to_vec1()?;
        let probs: Vec<f32> = r.prob_A.to_dtype(DType::F32)?.to_vec1()?;
        let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        match r.top_k {
            Some(k) => {
                for (a, (&x, &p)) in ids.iter().zip(&probs).enumerate() {
                    rows[a / k.max(1)].push((x, p));
                }
            }
            None => {
                let tok: Vec<u32> = r.token_A.to_vec1()?;
                for ((&t, &x), &p) in tok.iter().zip(&ids).zip(&probs) {
                    rows[t as usize].push((x, p));
                }
                rows.iter_mut().for_each(|row| row.sort_by_key(|&(x, _)| x));
            }
        }
        rows_LN.push(rows);
    }
    let w = rows_LN[0][..].first().map_or(0, Vec::len);
    let fixed = rows_LN.iter().all(|rows| rows.iter().all(|row| row.len() == w)) && w > 0;
    let (mut ids, mut probs, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..n {
        for rows in &rows_LN {
            counts.push(rows[t].len() as u32);
            for &(x, p) in &rows[t] {
                ids.push(x);
                probs.push(p);
            }
        }
    }
    let layers: Vec<u32> = rec.keys().map(|&l| l as u32).collect();
    let probs = Some(Probs::from_f32(ProbDtype::F32, &probs));
    let named = |e: lockstep_trace::TraceError| TrainError::input("routes", e.to_string());
    let trace = if fixed {
        RouteTrace::from_u32(TraceMeta::top_k(e as u32, w as u32), layers, n, &ids, vec![false; n], probs).map_err(named)?
    } else {
        let ids16: Vec<u16> = ids.iter().map(|&x| x as u16).collect();
        RouteTrace::new_variable(TraceMeta::top_k(e as u32, 0), layers, n, &counts, ids16, vec![false; n], probs).map_err(named)?
    };
    Ok(Some(trace))
}
