//! Token choice: each token picks K experts.
//!
//! Selection uses the scores plus the expert bias (if any). With `n_group > 1` a token first
//! keeps its `topk_group` best groups (group score = sum of the group's two best biased scores),
//! the other experts' biased scores become −∞, then the top K are taken. Ties go to the lower
//! group / expert index. Ids come out in descending biased score (the selection order).
//! −∞, not 0: LLaDA2's `LLaDA2MoeGate.group_limited_topk` (`modeling_llada2_moe.py`) and
//! DeepSeek-V3's reference `Gate` mask with `float("-inf")`; transformers' DeepSeek-V3 / GLM-4.5
//! routers write `masked_fill(~mask, 0.0)`, which lets an expert of a dropped group win whenever
//! the kept experts' biased scores are negative. Config validation guarantees the kept groups
//! hold at least K experts, so no −∞ entry is ever selected.
//!
//! Weights: w = s_sel (unbiased scores at the ids); iff `norm_topk_prob`: softmax routers
//! w / Σw, sigmoid routers w / (Σw + 1e-20); then × `routed_scaling_factor`.
//! Replay-recompute gathers the live scores at the forced ids and applies the same weight rule
//! (no bias, no group step).
//! Both the gather and the weight rule are one fused op (`fused::topk_weights`, the same in
//! every mode), and token_A (a / K) is filled on the scores' device (`fused::token_map`).

use candle_core::{DType, Result as CResult, Tensor};

use super::fused::{self, WeightRule};
use super::select::TopK;
use super::Router;
use crate::config::RouterConfig;
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
            if forced.elem_count() != n * k {
                return Err(ModelError::routing(layer, format!("replay ids hold {} entries for {n} tokens x {k}", forced.elem_count())));
            }
            // Everything stays where the scores are (no host copy): free rows (ROUTE_FREE)
            // take the router's own choice, forced rows keep theirs.
            let forced = forced.to_dtype(DType::U32)?.reshape((n, k))?;
            let free_NK = forced
                .narrow(1, 0, 1)?
                .eq(&Tensor::full(ROUTE_FREE, (n, 1), scores_NE.device())?)?
                .broadcast_as((n, k))?
                .contiguous()?;
            let ids = free_NK.where_cond(&select(r, &scores_NE)?, &forced)?;
            let (probs, live) = weights_at(r, &scores_NE, &ids)?;
            let weights = match &replay.weights {
                ReplayWeights::Recompute => live,
                // supplied weights are data, not part of this graph; free rows get live ones
                ReplayWeights::Given(w) => free_NK.where_cond(&live, &w.detach().to_dtype(DType::F32)?.reshape((n, k))?)?,
            };
            (ids, probs, weights)
        }
    };
    let token_A = fused::token_map(&ids_NK)?;
    Ok(LayerRoute {
        num_tokens: n,
        top_k: Some(k),
        token_A,
        expert_A: ids_NK.flatten_all()?,
        prob_A: probs_NK.flatten_all()?,
        weight_A: weights_NK.flatten_all()?,
        scores_NE,
        logits_NE,
    })
}

/// Selected ids [N, K] u32, on the scores' device (`select::TopK`).
pub(super) fn select(r: &Router, scores_NE: &Tensor) -> Result<Tensor> {
    Ok(TopK::of(&r.cfg).apply(&r.selection_scores(scores_NE)?)?)
}

/// Group-limited top-k over one token's biased scores (see the module doc).
pub fn select_row(choice: &[f32], cfg: &RouterConfig) -> Vec<usize> {
    super::select::select_row(choice, cfg.n_group, cfg.topk_group, cfg.top_k)
}

/// Scores at `ids` and the weights they imply (module doc), both [N, K], from one fused op.
fn weights_at(r: &Router, scores_NE: &Tensor, ids_NK: &Tensor) -> CResult<(Tensor, Tensor)> {
    fused::topk_weights(scores_NE, ids_NK, WeightRule::of(&r.cfg))
}
