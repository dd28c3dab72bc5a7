//! From one micro-batch's forward to the loss inputs: the routing plan that replays the
//! inference routes, the route terms per slot (Plackett–Luce log-probabilities, router-shift
//! weights; aligned by [`crate::route_terms`]), and route agreement.
//!
//! Legend: N token slots, W experts per route row, E experts.

use std::collections::BTreeMap;

use candle_core::Tensor;
use lockstep_model::config::{RoutingStrategy, ScoreFunction};
use lockstep_model::metrics::HostRoute;
use lockstep_model::{LayerRoute, MoeCausalLm, RoutingPlan};

use crate::batch::TrainBatch;
use lockstep_trace::RouteTrace;
use crate::error::{Result, TrainError};
use crate::loss::{RatioMode, PiOld};
use crate::route_terms::{accumulate_shift, gather_ids, plackett_luce, plackett_luce_NW, scores_at, shift_host, shift_to_slots, shift_weights, RowIndex};

/// The forward's routing plan: record freely, or (replay on and routes present) force the
/// inference route rows as they come, in the route trace's layout
/// ([`RoutingPlan::replay_rows`]: top-k rows for token choice, (token, expert) assignments for
/// expert choice), with live weights (the router gets gradients).
pub fn plan(model: &MoeCausalLm, tb: &TrainBatch, replay: bool) -> Result<RoutingPlan> {
    let Some(r) = tb.routes.as_ref().filter(|_| replay) else { return Ok(RoutingPlan::record()) };
    match (r.ids_u32(), r.top_k()) {
        (Some(ids), Some(width)) => Ok(RoutingPlan::replay_rows(&model.cfg, &tb.route_layers(), &ids, width, model.device())?),
        // variable rows (expert choice over wide pools): each layer's (token, expert) pairs
        _ => {
            let pairs: Vec<Vec<(u32, u32)>> = (0..r.num_layers())
                .map(|li| (0..r.num_tokens()).flat_map(|t| r.row(t, li).unwrap_or(&[]).iter().map(move |&e| (t as u32, u32::from(e)))).collect())
                .collect();
            Ok(RoutingPlan::replay_pairs(&model.cfg, &tb.route_layers(), &pairs, model.device())?)
        }
    }
}

/// Route inputs of the loss for one micro-batch (all per slot, aligned).
#[derive(Debug, Default)]
pub struct RouteInputs {
    pub route_logp_train: Vec<Tensor>,
    pub route_logp_old: Vec<Tensor>,
    pub joint_available: Option<Vec<f32>>,
    pub shift_weight: Option<Vec<f32>>,
}

/// The old policy's router probabilities at the replayed experts of layer `l`: π_infer's (sent
/// with the routes) or π_old's (recomputed by [`crate::trainer::Trainer::score`]).
/// In [`RowIndex`] order: the real rows' experts, token by token.
fn old_probs(tb: &TrainBatch, l: usize, r: &RouteTrace, li: usize, pi_old: PiOld) -> Result<Option<Vec<f32>>> {
    match pi_old {
        PiOld::Infer => Ok(RowIndex::recorded(r, li)),
        PiOld::Recompute => {
            let old = tb.old.as_ref().ok_or_else(|| TrainError::input("old", "pi_old = recompute: score the batch first (Trainer::score)"))?;
            Ok(old.route_probs.get(&l).cloned())
        }
    }
}

/// The inference route's layers: (layer index in the trace, decoder layer), with the trace.
fn layers_of(tb: &TrainBatch) -> Vec<(usize, usize, &RouteTrace)> {
    match &tb.routes {
        Some(r) => r.layers().iter().enumerate().map(|(li, &l)| (li, l as usize, r)).collect(),
        None => Vec::new(),
    }
}

/// The route terms the ratio mode needs, from the forward's routes.
pub fn route_inputs(model: &MoeCausalLm, tb: &TrainBatch, routes: &BTreeMap<usize, LayerRoute>, ratio: RatioMode, pi_old: PiOld) -> Result<RouteInputs> {
    let n = tb.batch.num_slots();
    let valid = tb.valid();
    let dev = model.device();
    let mut out = RouteInputs::default();
    let layers = layers_of(tb);
    match ratio {
        RatioMode::Token => {}
        RatioMode::Joint(_) => {
            let mut avail = vec![f32::from(u8::from(!layers.is_empty())); n];
            for &(li, l, r) in &layers {
                let live = routes.get(&l).ok_or_else(|| TrainError::input(&format!("routes[{l}]"), "not an MoE layer of the model"))?;
                let (ids, real) = gather_ids(r, li, dev)?;
                let w = r.top_k().unwrap_or(0);
                let p_train = scores_at(&live.scores_NE, &ids)?;
                out.route_logp_train.push(shift_to_slots(&plackett_luce_NW(&p_train)?, &valid)?);
                let mut pos = vec![0f32; n];
                let mut ok = vec![false; n];
                if let Some(p) = old_probs(tb, l, r, li, pi_old)? {
                    let ix = RowIndex::of(r, li, model.cfg.moe.router.num_experts);
                    for q in 0..n {
                        let row = &p[ix.offsets[q]..ix.offsets[q + 1]];
                        if row.len() != w {
                            continue;
                        }
                        // free rows, and rows whose probabilities were not sent (0), fall back
                        if real[q] && row.iter().all(|&x| x > 0.0) {
                            pos[q] = plackett_luce(row);
                            ok[q] = true;
                        }
                    }
                }
                out.route_logp_old.push(Tensor::from_vec(shift_host(&pos, &valid, 0.0), n, dev)?);
                for (a, o) in avail.iter_mut().zip(shift_host(&ok, &valid, false)) {
                    if !o {
                        *a = 0.0;
                    }
                }
            }
            out.joint_available = Some(avail);
        }
        RatioMode::RouterShift { floor } => {
            let (mut sum, mut count) = (vec![0f64; n], vec![0f64; n]);
            for &(li, l, r) in &layers {
                let live = routes.get(&l).ok_or_else(|| TrainError::input(&format!("routes[{l}]"), "not an MoE layer of the model"))?;
                let Some(g_old) = old_probs(tb, l, r, li, pi_old)? else { continue };
                let ix = RowIndex::of(r, li, model.cfg.moe.router.num_experts);
                let g_theta: Vec<f32> = ix.scores(&live.scores_NE.detach())?.to_vec1()?;
                accumulate_shift(&g_theta, &g_old, &ix, &mut sum, &mut count);
            }
            out.shift_weight = Some(shift_host(&shift_weights(&sum, &count, floor), &valid, 1.0));
        }
    }
    Ok(out)
}

/// The router probabilities of π_θ at each layer's replayed experts ([`RowIndex`] order, host):
/// what [`crate::trainer::Trainer::score`] keeps as π_old's.
pub fn route_probs_at(model: &MoeCausalLm, tb: &TrainBatch, routes: &BTreeMap<usize, LayerRoute>) -> Result<BTreeMap<usize, Vec<f32>>> {
    let mut m = BTreeMap::new();
    for (li, l, r) in layers_of(tb) {
        let live = routes.get(&l).ok_or_else(|| TrainError::input(&format!("routes[{l}]"), "not an MoE layer of the model"))?;
        let ix = RowIndex::of(r, li, model.cfg.moe.router.num_experts);
        m.insert(l, ix.scores(&live.scores_NE.detach())?.to_vec1()?);
    }
    Ok(m)
}

/// Expert sets of `n` token slots from (token, expert) pairs, as sorted runs of one flat
/// vector: slot t's set is `experts[offsets[t]..offsets[t + 1]]`, ascending (a counting sort:
/// no allocation per slot).
#[derive(Debug)]
struct FlatSets {
    offsets: Vec<usize>,
    experts: Vec<u32>,
}

impl FlatSets {
    fn of(n: usize, pairs: &[(u32, u32)]) -> Result<Self> {
        let mut offsets = vec![0usize; n + 1];
        for &(t, _) in pairs {
            let t = t as usize;
            if t >= n {
                return Err(TrainError::input("routes", format!("token {t} of a route past the batch's {n} slots")));
            }
            offsets[t + 1] += 1;
        }
        for t in 0..n {
            offsets[t + 1] += offsets[t];
        }
        let mut fill = offsets.clone();
        let mut experts = vec![0u32; pairs.len()];
        for &(t, e) in pairs {
            experts[fill[t as usize]] = e;
            fill[t as usize] += 1;
        }
        for t in 0..n {
            experts[offsets[t]..offsets[t + 1]].sort_unstable();
        }
        Ok(Self { offsets, experts })
    }

    fn get(&self, t: usize) -> &[u32] {
        &self.experts[self.offsets[t]..self.offsets[t + 1]]
    }
}

/// The experts every token slot would get under free routing from a layer's live scores (the
/// router's own free choice, token or expert choice), as host (token, expert) pairs.
pub fn free_pairs(model: &MoeCausalLm, layer: usize, route: &LayerRoute, batch: &lockstep_model::Batch) -> Result<Vec<(u32, u32)>> {
    Ok(model.moe_block_checked(layer)?.router.free_pairs(&route.scores_NE.detach(), batch)?)
}

/// Route agreement of one layer, on the host: the share of real token slots whose free
/// selection (`free`, [`free_pairs`]) equals, as a set, the inference route (the replayed rows
/// of `tb`; without inference routes, the route the forward applied, `applied`). Returns
/// (agreeing, compared).
pub fn agreement_of(layer: usize, real: &[bool], free: &[(u32, u32)], applied: &HostRoute, tb: &TrainBatch) -> Result<(f64, f64)> {
    let n = applied.num_tokens;
    let free = FlatSets::of(n, free)?;
    let (mut same, mut total) = (0.0, 0.0);
    match layers_of(tb).into_iter().find(|&(_, l, _)| l == layer) {
        Some((li, _, r)) => {
            let mut row: Vec<u32> = Vec::new();
            for (q, &is_real) in real.iter().enumerate().take(n.min(r.num_tokens())) {
                let (true, Some(inf)) = (is_real, r.row(q, li)) else { continue };
                row.clear();
                row.extend(inf.iter().map(|&x| u32::from(x)));
                row.sort_unstable();
                row.dedup();
                total += 1.0;
                if row.as_slice() == free.get(q) {
                    same += 1.0;
                }
            }
        }
        None => {
            let pairs: Vec<(u32, u32)> = applied.tok.iter().copied().zip(applied.exp.iter().copied()).collect();
            let applied = FlatSets::of(n, &pairs)?;
            for (q, &is_real) in real.iter().enumerate().take(n) {
                if is_real {
                    total += 1.0;
                    if applied.get(q) == free.get(q) {
                        same += 1.0;
                    }
                }
            }
        }
    }
    Ok((same, total))
}

/// The joint ratio needs a per-token route probability: a softmax token-choice router.
pub fn check_joint(model: &MoeCausalLm) -> Result<()> {
    let r = &model.cfg.moe.router;
    if r.score_function != ScoreFunction::Softmax {
        return Err(TrainError::input("loss.ratio", "joint ratios need softmax router probabilities (Plackett–Luce); this router scores with a sigmoid: use ratio = token or router_shift"));
    }
    if r.strategy != RoutingStrategy::TokenChoice {
        return Err(TrainError::input("loss.ratio", "joint ratios need token-choice routes (experts that a token drew); expert choice has none: use ratio = token or router_shift"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::FlatSets;

    /// Pairs in any order group into per-slot ascending runs; an empty slot is an empty run; a
    /// token past the slots is refused.
    #[test]
    fn flat_sets_group_and_sort_pairs() {
        let s = FlatSets::of(4, &[(2, 7), (0, 3), (2, 1), (0, 9), (3, 5), (2, 4)]).unwrap();
        assert_eq!((s.get(0), s.get(1), s.get(2), s.get(3)), (&[3, 9][..], &[][..], &[1, 4, 7][..], &[5][..]));
        assert!(FlatSets::of(2, &[(2, 0)]).unwrap_err().to_string().contains("token 2"));
    }
}
