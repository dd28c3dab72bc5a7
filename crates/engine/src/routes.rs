//! Route rows out of a forward's recording: the width of a generated sequence's rows, a layer's
//! route as token-major rows, and a step's routes as one route trace over its slots (what the
//! engine cuts each sequence's rows from and what `crate::consistency` compares).

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

/// The routes of a forward as a route trace over its slots (`[slot][layer][width]`, router
/// probabilities in f32, no missing row): what the engine cuts every sequence's rows from and
/// what [`crate::consistency`] compares; `None` when nothing was recorded.
pub fn forward_trace(routes: &BTreeMap<usize, LayerRoute>, width: usize, num_experts: usize) -> Result<Option<RouteTrace>> {
    let Some(n) = routes.values().next().map(|r| r.num_tokens) else { return Ok(None) };
    let per_layer: Vec<(Vec<u32>, Vec<f32>)> = if routes.values().all(|r| r.top_k.is_some()) {
        // token choice: every layer's rows already token-major; one copy to the host for all
        // layers' ids and one for their probabilities (not two per layer)
        let ids: Vec<Tensor> = routes.values().map(|r| r.expert_A.clone()).collect();
        let probs: Vec<Tensor> = routes.values().map(|r| r.prob_A.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        let (ids, probs): (Vec<u32>, Vec<f32>) = (Tensor::cat(&ids, 0)?.to_vec1()?, Tensor::cat(&probs, 0)?.to_vec1()?);
        let per = n * width;
        if ids.len() != per * routes.len() || probs.len() != ids.len() {
            return Err(EngineError::Request { id: 0, field: "routes".into(), msg: format!("{} route entries for {} layers of {n} tokens x {width}", ids.len(), routes.len()) });
        }
        (0..routes.len()).map(|l| (ids[l * per..(l + 1) * per].to_vec(), probs[l * per..(l + 1) * per].to_vec())).collect()
    } else {
        routes.values().map(|r| token_rows(r, width)).collect::<Result<_>>()?
    };
    let (mut ids, mut probs) = (Vec::with_capacity(n * per_layer.len() * width), Vec::with_capacity(n * per_layer.len() * width));
    for t in 0..n {
        for (i, p) in &per_layer {
            ids.extend_from_slice(&i[t * width..(t + 1) * width]);
            probs.extend_from_slice(&p[t * width..(t + 1) * width]);
        }
    }
    let meta = TraceMeta::top_k(num_experts as u32, width as u32);
    let layers = routes.keys().map(|&l| l as u32).collect();
    let trace = RouteTrace::from_u32(meta, layers, n, &ids, vec![false; n], Some(Probs::from_f32(ProbDtype::F32, &probs)))
        .map_err(|e| EngineError::Request { id: 0, field: "routes".into(), msg: e.to_string() })?;
    Ok(Some(trace))
}

