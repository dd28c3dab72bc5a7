//! Expert choice: each expert picks its tokens (Zhou et al. 2022).
//!
//! Tokens are grouped into pools — blocks of `block_size` tokens of one sequence (by position:
//! block = position / block_size), whole sequences, or the whole micro-batch; padding is never
//! pooled. In a pool of P tokens every expert takes its top-C tokens by score, with
//!
//! ```text
//! C = min(P, ceil(capacity_factor · P / E))
//! ```
//!
//! (computed in f64 as ceil(x − 1e-9), so an exact integer product is not bumped up by rounding).
//! Ties go to the lower token slot. A token may get 0, 1 or many experts; tokens no expert took
//! pass through the residual path (and the shared experts, if any).
//!
//! Weight of an assignment = the pair's score (softmax over experts or sigmoid) ×
//! `routed_scaling_factor`; no renormalisation. Replay-recompute gathers the live scores at the
//! forced pairs.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::select::ExpertChoice;
use super::Router;
use crate::batch::Batch;
use crate::config::Pool;
use crate::error::{ModelError, Result};
use crate::routing::{ForcedRoute, LayerRoute, ReplayWeights, RouteMode};

/// Token slots of each pool, in slot order.
pub fn pools(batch: &Batch, pool: Pool) -> Vec<Vec<u32>> {
    let (b, t) = batch.dims();
    let seg = batch.segments();
    let pos = batch.positions();
    let mut by_key: BTreeMap<(usize, u32, u32), Vec<u32>> = BTreeMap::new();
    for slot in 0..b * t {
        if seg[slot] == 0 {
            continue;
        }
        let key = match pool {
            Pool::Batch => (0, 0, 0),
            Pool::Sequence => (slot / t, seg[slot], 0),
            Pool::Block(n) => (slot / t, seg[slot], pos[slot] / n as u32),
        };
        by_key.entry(key).or_default().push(slot as u32);
    }
    by_key.into_values().collect()
}

/// C for a pool of `p` tokens (module doc).
pub fn capacity(capacity_factor: f64, p: usize, num_experts: usize) -> usize {
    let c = (capacity_factor * p as f64 / num_experts as f64 - 1e-9).ceil().max(0.0) as usize;
    c.min(p)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn route(
    r: &Router,
    logits_NE: Tensor,
    scores_NE: Tensor,
    mode: &RouteMode,
    layer: usize,
    batch: &Batch,
    capacity_factor: f64,
    pool: Pool,
) -> Result<LayerRoute> {
    let (n, e) = scores_NE.dims2()?;
    let (token_A, expert_A, given) = match mode {
        RouteMode::Compute | RouteMode::Record => {
            let choice = r.selection_scores(&scores_NE)?;
            let pools = pools(batch, pool);
            let caps = pools.iter().map(|p| capacity(capacity_factor, p.len(), e)).collect();
            // selected where the scores live (select::ExpertChoice; on CUDA, gpu::route)
            let pairs_2A = ExpertChoice { pools, caps }.apply(&choice)?;
            (pairs_2A.get(0)?, pairs_2A.get(1)?, None)
        }
        RouteMode::Replay(replay) => {
            let ForcedRoute::Assignments { token_A, expert_A } = &replay.route else {
                return Err(ModelError::routing(layer, "expert-choice router given top-k ids; replay its assignments"));
            };
            let given = match &replay.weights {
                ReplayWeights::Recompute => None,
                ReplayWeights::Given(w) => Some(w.detach().to_dtype(DType::F32)?.flatten_all()?),
            };
            (token_A.to_dtype(DType::U32)?.flatten_all()?, expert_A.to_dtype(DType::U32)?.flatten_all()?, given)
        }
    };
    // prob_A = scores_NE[token, expert], gathered on the device
    let e_1 = Tensor::new(&[e as u32], scores_NE.device())?;
    let flat_A = token_A.broadcast_mul(&e_1)?.add(&expert_A)?;
    let prob_A = scores_NE.flatten_all()?.index_select(&flat_A, 0)?;
    let weight_A = match given {
        Some(w) => w,
        None => r.scale(prob_A.clone())?,
    };
    Ok(LayerRoute { num_tokens: n, top_k: None, token_A, expert_A, prob_A, weight_A, scores_NE, logits_NE })
}
