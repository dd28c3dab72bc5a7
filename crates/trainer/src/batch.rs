//! What one packed micro-batch carries into a trainer step: tokens, the behaviour policy's
//! log-probabilities, advantages, the loss mask, the inference routes per MoE layer and —
//! once [`crate::trainer::Trainer::score`] ran — the old policy π_old.
//!
//! Every per-slot vector is indexed by token slot n of the packed batch: `logp_infer[n]` is
//! log π(y_n), the probability of the token *at* n (computed at position n − 1); route rows are
//! indexed by the position that *ran* them (row n = the experts of token n as input). The loss
//! pairs the token at n with the route row of n − 1 ([`crate::route_terms`]).
//!
//! Legend: N token slots, W experts per route row (top-k for token choice, every expert for
//! expert choice over one-token pools).

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use lockstep_model::{Batch, Recording, ROUTE_FREE};

use crate::error::{Result, TrainError};

/// Inference-time route of one MoE layer for every slot of a micro-batch: `width` experts per
/// slot (a row of all [`ROUTE_FREE`] routes freely: padding, rows an engine did not send).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReplay {
    ids: Vec<u32>,
    probs: Option<Vec<f32>>,
    width: usize,
}

impl LayerReplay {
    /// `ids` [N·W]; `probs` [N·W] the router probabilities of those experts at inference
    /// (0 where unknown), when the engine sent them.
    pub fn new(ids: Vec<u32>, probs: Option<Vec<f32>>, width: usize) -> Result<Self> {
        if width == 0 || ids.len() % width != 0 {
            return Err(TrainError::input("routes.ids", format!("{} ids do not form rows of {width}", ids.len())));
        }
        if let Some(p) = &probs {
            if p.len() != ids.len() {
                return Err(TrainError::input("routes.probs", format!("{} values for {} ids", p.len(), ids.len())));
            }
        }
        for (n, row) in ids.chunks(width).enumerate() {
            let free = row.iter().filter(|&&i| i == ROUTE_FREE).count();
            if free != 0 && free != width {
                return Err(TrainError::input("routes.ids", format!("row {n} mixes ROUTE_FREE with expert ids")));
            }
        }
        Ok(Self { ids, probs, width })
    }
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
    pub fn probs(&self) -> Option<&[f32]> {
        self.probs.as_deref()
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn rows(&self) -> usize {
        self.ids.len() / self.width
    }
    /// Row `n`'s ids (W of them).
    pub fn row(&self, n: usize) -> &[u32] {
        &self.ids[n * self.width..(n + 1) * self.width]
    }
    pub fn is_free(&self, n: usize) -> bool {
        self.ids[n * self.width] == ROUTE_FREE
    }
}

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
    /// keyed by decoder layer index; empty when the samples came without routes
    pub routes: BTreeMap<usize, LayerReplay>,
    /// π_old, set by [`crate::trainer::Trainer::score`]
    pub old: Option<OldPolicy>,
}

impl TrainBatch {
    /// A micro-batch; every per-slot vector must have one value per slot of `batch` and every
    /// route one row per slot.
    pub fn new(batch: Batch, logp_infer: Vec<f32>, advantages: Vec<f32>, loss_mask: Vec<f32>, routes: BTreeMap<usize, LayerReplay>) -> Result<Self> {
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
        for (l, r) in &self.routes {
            if r.rows() != n {
                return Err(TrainError::input(&format!("routes[{l}].ids"), format!("{} rows of {} for {n} slots", r.rows(), r.width())));
            }
        }
        if let Some(o) = &self.old {
            if o.logp.len() != n {
                return Err(TrainError::input("old.logp", format!("{} values for {n} slots", o.logp.len())));
            }
        }
        Ok(())
    }

    /// From a micro-batch of the route-transport packer: `[token][layer][w]` rows become per
    /// layer `[N·W]` rows; free rows (padding, missing, samples without routes) stay
    /// `ROUTE_FREE` and route freely.
    pub fn from_micro_batch(mb: &lockstep_trace::pack::MicroBatch, device: &Device) -> Result<Self> {
        let n = mb.len();
        let cu: Vec<usize> = mb.cu_seqlens.iter().map(|&c| c as usize).collect();
        let batch = Batch::packed(&mb.tokens, Some(&mb.position_ids), &cu, device)?;
        let (nl, w) = (mb.layers.len(), mb.top_k);
        let mut routes = BTreeMap::new();
        for (li, &layer) in mb.layers.iter().enumerate() {
            let mut ids = Vec::with_capacity(n * w);
            let mut probs = mb.route_probs.as_ref().map(|_| Vec::with_capacity(n * w));
            for t in 0..n {
                let a = (t * nl + li) * w;
                ids.extend_from_slice(&mb.route_ids[a..a + w]);
                if let (Some(p), Some(src)) = (probs.as_mut(), mb.route_probs.as_ref()) {
                    p.extend_from_slice(&src[a..a + w]);
                }
            }
            routes.insert(layer as usize, LayerReplay::new(ids, probs, w)?);
        }
        Self::new(batch, mb.logprobs.clone(), mb.advantages.clone(), mb.loss_mask.iter().map(|&m| f32::from(u8::from(m))).collect(), routes)
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

/// Routes of a recording as inference-time routes (what an engine would send): ids and probs,
/// token-major rows (expert choice: every token's experts in expert order; every token must
/// have the same number).
pub fn replay_from_recording(rec: &Recording) -> Result<BTreeMap<usize, LayerReplay>> {
    rec.iter()
        .map(|(&l, r)| {
            let ids: Vec<u32> = r.expert_A.to_vec1()?;
            let probs: Vec<f32> = r.prob_A.to_dtype(DType::F32)?.to_vec1()?;
            if let Some(k) = r.top_k {
                return Ok((l, LayerReplay::new(ids, Some(probs), k)?));
            }
            let tok: Vec<u32> = r.token_A.to_vec1()?;
            let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); r.num_tokens];
            for ((&t, &e), &p) in tok.iter().zip(&ids).zip(&probs) {
                rows[t as usize].push((e, p));
            }
            let w = rows.iter().map(Vec::len).max().unwrap_or(0);
            if let Some((n, row)) = rows.iter().enumerate().find(|(_, row)| row.len() != w) {
                return Err(TrainError::input(&format!("routes[{l}]"), format!("token slot {n} has {} experts, others {w}", row.len())));
            }
            for row in &mut rows {
                row.sort_by_key(|&(e, _)| e);
            }
            let (ids, probs): (Vec<u32>, Vec<f32>) = rows.into_iter().flatten().unzip();
            Ok((l, LayerReplay::new(ids, Some(probs), w.max(1))?))
        })
        .collect()
}
