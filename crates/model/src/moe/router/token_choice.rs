//! Token choice: each token picks K experts.
//!
//! Selection uses the scores plus the expert bias (if any). With `n_group > 1` a token first
//! keeps its `topk_group` best groups (group score = sum of the group's two best biased scores),
//! the other experts' biased scores become 0 (transformers' `masked_fill(~mask, 0.0)`), then the
//! top K are taken. Ties go to the lower group / expert index. Ids come out in descending biased
//! score (the selection order).
//!
//! Weights: w = s_sel (unbiased scores at the ids); iff `norm_topk_prob`: softmax routers
//! w / Σw, sigmoid routers w / (Σw + 1e-20); then × `routed_scaling_factor`.
//! Replay-recompute gathers the live scores at the forced ids and applies the same weight rule
//! (no bias, no group step).

use candle_core::{DType, Device, Result as CResult, Tensor};

use super::Router;
use crate::config::{RouterConfig, ScoreFunction};
use crate::error::{ModelError, Result};
use crate::routing::{ForcedRoute, LayerRoute, ReplayWeights, RouteMode, ROUTE_FREE};

pub(super) fn route(r: &Router, logits_NE: Tensor, scores_NE: Tensor, mode: &RouteMode, layer: usize) -> Result<LayerRoute> {
    let n = scores_NE.dim(0)?;
    let k = r.cfg.top_k;
    let (ids_NK, probs_NK, weights_NK) = match mode {
        RouteMode::Compute | RouteMode::Record => {
            let ids = select(r, &scores_NE)?;
            let (p, w) = weights_at(r, &scores_NE, &ids)?;
            (ids, p, w)
        }
        RouteMode::Replay(replay) => {
            let ForcedRoute::TopK(forced) = &replay.route else {
                return Err(ModelError::routing(layer, "token-choice router given forced assignments; replay top-k ids"));
            };
            let forced = forced.to_dtype(DType::U32)?;
            let forced_host: Vec<u32> = forced.flatten_all()?.to_vec1()?;
            if forced_host.len() != n * k {
                return Err(ModelError::routing(layer, format!("replay ids hold {} entries for {n} tokens x {k}", forced_host.len())));
            }
            let free_rows: Vec<bool> = forced_host.chunks(k).map(|row| row[0] == ROUTE_FREE).collect();
            let any_free = free_rows.iter().any(|&f| f);
            let dev = scores_NE.device();
            let ids = if any_free {
                // free rows take the router's own choice; forced rows keep theirs
                let own: Vec<u32> = select(r, &scores_NE)?.flatten_all()?.to_vec1()?;
                let merged: Vec<u32> = forced_host
                    .chunks(k)
                    .zip(own.chunks(k))
                    .flat_map(|(f, o)| if f[0] == ROUTE_FREE { o.to_vec() } else { f.to_vec() })
                    .collect();
                Tensor::from_vec(merged, (n, k), dev)?
            } else {
                forced.reshape((n, k))?
            };
            let (probs, live) = weights_at(r, &scores_NE, &ids)?;
            let weights = match &replay.weights {
                ReplayWeights::Recompute => live,
                ReplayWeights::Given(w) => {
                    // supplied weights are data, not part of this graph
                    let w = w.detach().to_dtype(DType::F32)?.reshape((n, k))?;
                    if any_free {
                        free_mask(&free_rows, k, dev)?.where_cond(&live, &w)?
                    } else {
                        w
                    }
                }
            };
            (ids, probs, weights)
        }
    };
    let token_A: Vec<u32> = (0..(n * k) as u32).map(|a| a / k as u32).collect();
    Ok(LayerRoute {
        num_tokens: n,
        top_k: Some(k),
        token_A: Tensor::from_vec(token_A, n * k, scores_NE.device())?,
        expert_A: ids_NK.flatten_all()?,
        prob_A: probs_NK.flatten_all()?,
        weight_A: weights_NK.flatten_all()?,
        scores_NE,
        logits_NE,
    })
}

/// Selected ids [N, K] u32.
pub(super) fn select(r: &Router, scores_NE: &Tensor) -> Result<Tensor> {
    let cfg = &r.cfg;
    if r.expert_bias.is_none() && cfg.n_group == 1 {
        // plain top-k on the device
        return Ok(scores_NE.arg_sort_last_dim(false)?.narrow(1, 0, cfg.top_k)?.contiguous()?);
    }
    let choice = match &r.expert_bias {
        Some(b) => scores_NE.broadcast_add(&b.to_dtype(DType::F32)?.unsqueeze(0)?)?,
        None => scores_NE.clone(),
    };
    let (n, e) = choice.dims2()?;
    let host: Vec<f32> = choice.flatten_all()?.to_vec1()?;
    let mut ids = Vec::with_capacity(n * cfg.top_k);
    for row in host.chunks(e) {
        ids.extend(select_row(row, cfg).into_iter().map(|i| i as u32));
    }
    Ok(Tensor::from_vec(ids, (n, cfg.top_k), scores_NE.device())?)
}

/// Indices of the `k` largest values, descending, ties to the lower index.
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Group-limited top-k over one token's biased scores (see the module doc).
pub fn select_row(choice: &[f32], cfg: &RouterConfig) -> Vec<usize> {
    if cfg.n_group <= 1 {
        return top_indices(choice, cfg.top_k);
    }
    let per = choice.len() / cfg.n_group;
    let group_scores: Vec<f32> = choice
        .chunks(per)
        .map(|g| top_indices(g, 2.min(per)).iter().map(|&i| g[i]).sum())
        .collect();
    let keep = top_indices(&group_scores, cfg.topk_group);
    let masked: Vec<f32> =
        choice.iter().enumerate().map(|(i, &s)| if keep.contains(&(i / per)) { s } else { 0.0 }).collect();
    top_indices(&masked, cfg.top_k)
}

/// Scores at `ids` and the weights they imply (module doc).
fn weights_at(r: &Router, scores_NE: &Tensor, ids_NK: &Tensor) -> CResult<(Tensor, Tensor)> {
    let probs_NK = scores_NE.gather(ids_NK, 1)?;
    let weights_NK = if r.cfg.norm_topk_prob {
        let sum = probs_NK.sum_keepdim(1)?;
        let den = match r.cfg.score_function {
            ScoreFunction::Softmax => sum,
            ScoreFunction::Sigmoid => (sum + 1e-20)?,
        };
        probs_NK.broadcast_div(&den)?
    } else {
        probs_NK.clone()
    };
    Ok((probs_NK, r.scale(weights_NK)?))
}

/// [N, K] u8 mask, 1 on the rows that route freely.
fn free_mask(free_rows: &[bool], k: usize, dev: &Device) -> CResult<Tensor> {
    let v: Vec<u8> = free_rows.iter().flat_map(|&f| std::iter::repeat_n(u8::from(f), k)).collect();
    Tensor::from_vec(v, (free_rows.len(), k), dev)
}
