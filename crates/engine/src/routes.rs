//! Route rows out of a forward's recording: the width of a generated sequence's rows, a layer's
//! route as token-major rows, a step's routes as rows over its slots (what the engine cuts each
//! sequence's rows from) and as one route trace (what `crate::consistency` compares).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use lockstep_model::config::{Pool, RoutingStrategy};
use lockstep_model::moe::router::expert_choice::capacity;
use lockstep_model::{LayerRoute, MoeCausalLm};
use lockstep_trace::{ProbDtype, Probs, RouteTrace, TraceMeta};

use crate::error::{EngineError, Result};

/// Experts per token in a generated sequence's routes: top-k for token choice; for expert choice
/// over one-token pools (`block:1`, the only expert choice that generates token by token) each
/// expert takes C = min(1, ceil(capacity_factor / E)) of every token, so E·C (every expert).
pub fn route_width(model: &MoeCausalLm) -> usize {
    let r = &model.cfg.moe.router;
    match r.strategy {
        RoutingStrategy::ExpertChoice { capacity_factor, pool: Pool::Block(1) } => r.num_experts * capacity(capacity_factor, 1, r.num_experts),
        _ => r.top_k,
    }
}

/// A layer's route as token-major rows of `width` experts: (ids, router probabilities), row n
/// = token slot n. Token choice rows are in selection order; expert choice assignments are
/// grouped by token (in expert order) and every token must have `width` of them.
pub fn token_rows(route: &LayerRoute, width: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let ids: Vec<u32> = route.expert_A.to_vec1()?;
    let probs: Vec<f32> = route.prob_A.to_dtype(DType::F32)?.to_vec1()?;
    if route.top_k.is_some() {
        return Ok((ids, probs));
    }
    let tok: Vec<u32> = route.token_A.to_vec1()?;
    let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::with_capacity(width); route.num_tokens];
    for ((&t, &e), &p) in tok.iter().zip(&ids).zip(&probs) {
        rows[t as usize].push((e, p));
    }
    if let Some((n, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != width) {
        return Err(EngineError::Request { id: 0, field: "routes".into(), msg: format!("token slot {n} has {} experts, expected {width}", r.len()) });
    }
    Ok(rows.into_iter().flatten().unzip())
}

/// A forward's routes as token-major rows over its slots (the engine's step-internal buffer; what
/// leaves the engine is a [`RouteTrace`]): `ids[(n · L + l) · width ..]` (and
/// `probs` alike, router probabilities in f32) for slot n and recorded layer l — what the engine
/// cuts every sequence's rows from each step (a [`RouteTrace`] is built once a sequence
/// finishes, not every step: its row checks cost ~0.1 µs a row, 40 ms a 8,192-token prefill
/// step of 48 layers). Ids are checked below `num_experts`.
#[derive(Debug)]
pub(crate) struct StepRows {
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
}

/// The [`StepRows`] of a forward's recording; `None` when nothing was recorded.
pub(crate) fn forward_rows(routes: &BTreeMap<usize, LayerRoute>, width: usize, num_experts: usize) -> Result<Option<(usize, StepRows)>> {
    let Some(n) = routes.values().next().map(|r| r.num_tokens) else { return Ok(None) };
    // layer-major: layer l's rows at [l · n · width ..]
    let (lm_ids, lm_probs): (Vec<u32>, Vec<f32>) = if routes.values().all(|r| r.top_k.is_some()) {
        // token choice: every layer's rows already token-major; one copy to the host for all
        // layers' ids and one for their probabilities (not two per layer)
        let ids: Vec<Tensor> = routes.values().map(|r| r.expert_A.clone()).collect();
        let probs: Vec<Tensor> = routes.values().map(|r| r.prob_A.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        (Tensor::cat(&ids, 0)?.to_vec1()?, Tensor::cat(&probs, 0)?.to_vec1()?)
    } else {
        let (mut ids, mut probs) = (Vec::new(), Vec::new());
        for r in routes.values() {
            let (i, p) = token_rows(r, width)?;
            ids.extend(i);
            probs.extend(p);
        }
        (ids, probs)
    };
    let (layers, per) = (routes.len(), n * width);
    if lm_ids.len() != per * layers || lm_probs.len() != lm_ids.len() {
        return Err(EngineError::Request { id: 0, field: "routes".into(), msg: format!("{} route entries for {layers} layers of {n} tokens x {width}", lm_ids.len()) });
    }
    let (mut ids, mut probs) = (Vec::with_capacity(per * layers), Vec::with_capacity(per * layers));
    for t in 0..n {
        for l in 0..layers {
            let at = l * per + t * width;
            ids.extend_from_slice(&lm_ids[at..at + width]);
            probs.extend_from_slice(&lm_probs[at..at + width]);
        }
    }
    if let Some(at) = ids.iter().position(|&e| e as usize >= num_experts) {
        return Err(EngineError::Request { id: 0, field: "routes".into(), msg: format!("route entry {at}: expert {} of {num_experts}", ids[at]) });
    }
    Ok(Some((n, StepRows { ids, probs })))
}

/// The routes of a forward as a route trace over its slots (`[slot][layer][width]`, router
/// probabilities in f32, no missing row): what [`crate::consistency`] compares; `None` when
/// nothing was recorded.
pub fn forward_trace(routes: &BTreeMap<usize, LayerRoute>, width: usize, num_experts: usize) -> Result<Option<RouteTrace>> {
    let Some((n, rows)) = forward_rows(routes, width, num_experts)? else { return Ok(None) };
    let meta = TraceMeta::top_k(num_experts as u32, width as u32);
    let layers = routes.keys().map(|&l| l as u32).collect();
    let trace = RouteTrace::from_u32(meta, layers, n, &rows.ids, vec![false; n], Some(Probs::from_f32(ProbDtype::F32, &rows.probs)))
        .map_err(|e| EngineError::Request { id: 0, field: "routes".into(), msg: e.to_string() })?;
    Ok(Some(trace))
}
