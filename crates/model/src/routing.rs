//! Routing modes, passed into the forward per MoE layer (keyed by decoder layer index):
//! compute, record, or replay a recorded route. This file holds the plan, the forced route and
//! the record; the router (`moe::router`) carries them out.
//!
//! Replay follows R3 / Megatron semantics: the assignments are forced; with
//! [`ReplayWeights::Recompute`] the weights are the *live* router scores gathered at the forced
//! experts (for token choice renormalised iff `norm_topk_prob`, times `routed_scaling_factor`;
//! no expert bias, no group step), so the router still receives gradients; with
//! [`ReplayWeights::Given`] the supplied weights are applied verbatim, as constants.
//!
//! A token-choice replay row of all [`ROUTE_FREE`] routes freely (padding slots of a packed
//! micro-batch, or tokens whose route a foreign engine did not provide).
//!
//! Legend: N token slots (B*T, batch-major), K experts per token, E experts, A assignments.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Expert id that marks a replay row as "route freely".
pub const ROUTE_FREE: u32 = u32::MAX;

/// Where replayed weights come from.
#[derive(Debug, Clone)]
pub enum ReplayWeights {
    /// Live router scores gathered at the forced assignments (router gets gradients).
    Recompute,
    /// These weights ([N, K] for top-k, [A] for assignments), applied verbatim.
    Given(Tensor),
}

/// The experts a replay forces.
#[derive(Debug, Clone)]
pub enum ForcedRoute {
    /// Token choice: [N, K] u32 expert ids per token in selection order.
    TopK(Tensor),
    /// Any routing (expert choice): flat (token, expert) pairs, [A] u32 each.
    Assignments { token_A: Tensor, expert_A: Tensor },
}

/// A forced route for one MoE layer.
#[derive(Debug, Clone)]
pub struct Replay {
    pub route: ForcedRoute,
    pub weights: ReplayWeights,
}

impl Replay {
    /// Force token-choice ids [N, K].
    pub fn top_k(ids_NK: Tensor, weights: ReplayWeights) -> Self {
        Self { route: ForcedRoute::TopK(ids_NK), weights }
    }

    /// Replay what a recorded layer did. A route whose assignments do not fit it (a top-k
    /// route without N · K experts, weights that are not one per assignment) is an error.
    pub fn of(route: &LayerRoute, recompute_weights: bool) -> Result<Self> {
        let a = route.expert_A.elem_count();
        let bad = |msg: String| Err(ModelError::batch("route", msg));
        if let Some(k) = route.top_k {
            if a != route.num_tokens * k {
                return bad(format!("a top-k route of {} tokens x {k} experts holds {a} experts", route.num_tokens));
            }
        } else if route.token_A.elem_count() != a {
            return bad(format!("{} tokens but {a} experts in the assignments", route.token_A.elem_count()));
        }
        if !recompute_weights && route.weight_A.elem_count() != a {
            return bad(format!("{} weights for {a} assignments", route.weight_A.elem_count()));
        }
        let forced = match route.top_k {
            Some(k) => ForcedRoute::TopK(route.expert_A.reshape((route.num_tokens, k))?),
            None => ForcedRoute::Assignments { token_A: route.token_A.clone(), expert_A: route.expert_A.clone() },
        };
        let weights = if recompute_weights {
            ReplayWeights::Recompute
        } else {
            match route.top_k {
                Some(k) => ReplayWeights::Given(route.weight_A.reshape((route.num_tokens, k))?),
                None => ReplayWeights::Given(route.weight_A.clone()),
            }
        };
        Ok(Self { route: forced, weights })
    }
}

#[derive(Debug, Clone)]
pub enum RouteMode {
    /// Route as the model does; nothing is returned.
    Compute,
    /// Route as the model does and return the decision ([`LayerRoute`]).
    Record,
    /// Force the given route; the decision actually applied is returned too.
    Replay(Replay),
}

/// The routing decision of one MoE layer: flat assignments (token, expert, weight), whichever
/// router made them. Token choice gives exactly K per token in token-major order
/// (`a = n·K + j`, j in selection order), so `ids_NK()` is a reshape; expert choice gives a
/// variable number per token, ordered by expert then by the expert's preference.
#[derive(Debug, Clone)]
pub struct LayerRoute {
    /// token slots N of the batch
    pub num_tokens: usize,
    /// Some(K) for token choice
    pub top_k: Option<usize>,
    /// [A] u32 token slot of each assignment
    pub token_A: Tensor,
    /// [A] u32 expert of each assignment
    pub expert_A: Tensor,
    /// [A] router score of the pair before renormalisation / scaling (softmax probability or
    /// sigmoid score)
    pub prob_A: Tensor,
    /// [A] weight applied to the expert's output
    pub weight_A: Tensor,
    /// [N, E] all router scores (softmax distribution or sigmoid scores)
    pub scores_NE: Tensor,
    /// [N, E] raw router logits
    pub logits_NE: Tensor,
}

impl LayerRoute {
    fn per_token(&self, t: &Tensor, what: &str) -> Result<Tensor> {
        match self.top_k {
            Some(k) => Ok(t.reshape((self.num_tokens, k))?),
            None => Err(ModelError::batch(what, "expert-choice routes have a variable number of experts per token")),
        }
    }
    /// [N, K] u32 selected experts (token choice only).
    pub fn ids_NK(&self) -> Result<Tensor> {
        self.per_token(&self.expert_A, "ids")
    }
    /// [N, K] scores of the selected experts before renormalisation (token choice only).
    pub fn probs_NK(&self) -> Result<Tensor> {
        self.per_token(&self.prob_A, "probs")
    }
    /// [N, K] applied weights (token choice only).
    pub fn weights_NK(&self) -> Result<Tensor> {
        self.per_token(&self.weight_A, "weights")
    }
    /// Host copies of (token, expert) per assignment.
    pub fn pairs(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((self.token_A.to_vec1()?, self.expert_A.to_vec1()?))
    }
}

/// Decisions of every recorded / replayed MoE layer, keyed by decoder layer index.
pub type Recording = BTreeMap<usize, LayerRoute>;

/// Routing mode for each MoE layer of one forward.
#[derive(Debug, Clone, Default)]
pub struct RoutingPlan {
    record_by_default: bool,
    layers: BTreeMap<usize, RouteMode>,
}

impl RoutingPlan {
    /// Every MoE layer computes its routes; nothing is recorded.
    pub fn compute() -> Self {
        Self::default()
    }

    /// Every MoE layer computes and records.
    pub fn record() -> Self {
        Self { record_by_default: true, layers: BTreeMap::new() }
    }

    /// Replay every layer of a recording ([`Replay::of`]; errors name the layer).
    pub fn replay(recording: &Recording, recompute_weights: bool) -> Result<Self> {
        let layers = recording
            .iter()
            .map(|(&l, r)| {
                let replay = Replay::of(r, recompute_weights).map_err(|e| match e {
                    ModelError::Batch { msg, .. } => ModelError::routing(l, format!("recorded route: {msg}")),
                    other => other,
                })?;
                Ok((l, RouteMode::Replay(replay)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { record_by_default: false, layers })
    }

    /// Record every MoE layer and replay the given route rows — the route trace's layout:
    /// `ids` is `[token][layer][width]` u32 over the batch's N slots for the decoder layers
    /// `layers`, a row of all [`ROUTE_FREE`] routing freely. Token choice (`strategy` of `cfg`)
    /// takes rows of `top_k` ids in selection order; expert choice takes each real row's experts
    /// as (token, expert) assignments, ordered by expert then token as the expert-choice router
    /// emits them. Weights are recomputed from the live scores (the router gets gradients).
    pub fn replay_rows(cfg: &ModelConfig, layers: &[usize], ids: &[u32], width: usize, device: &candle_core::Device) -> Result<Self> {
        let nl = layers.len();
        if width == 0 || nl == 0 || ids.len() % (nl * width) != 0 {
            return Err(ModelError::batch("routes", format!("{} ids do not form [token][{nl} layers][{width}] rows", ids.len())));
        }
        let n = ids.len() / (nl * width);
        let mut plan = Self::record();
        for (li, &layer) in layers.iter().enumerate() {
            let row = |t: usize| &ids[(t * nl + li) * width..(t * nl + li + 1) * width];
            let replay = match cfg.moe.router.strategy {
                crate::config::RoutingStrategy::TokenChoice => {
                    if width != cfg.moe.router.top_k {
                        return Err(ModelError::routing(layer, format!("route rows of {width} experts for a top-{} router", cfg.moe.router.top_k)));
                    }
                    let ids_NK: Vec<u32> = (0..n).flat_map(|t| row(t).iter().copied()).collect();
                    Replay::top_k(Tensor::from_vec(ids_NK, (n, width), device)?, ReplayWeights::Recompute)
                }
                crate::config::RoutingStrategy::ExpertChoice { .. } => {
                    let pairs: Vec<(u32, u32)> = (0..n).filter(|&t| row(t)[0] != ROUTE_FREE).flat_map(|t| row(t).iter().map(move |&e| (t as u32, e))).collect();
                    assignments_replay(&pairs, device)?
                }
            };
            plan = plan.with_layer(layer, RouteMode::Replay(replay));
        }
        Ok(plan)
    }

    /// Record every MoE layer and replay, for each of `layers`, its (token, expert) pairs —
    /// variable-width route rows (expert choice over wide pools: a token may have 0, 1 or many
    /// experts). Expert-choice routers only (token choice takes [`RoutingPlan::replay_rows`]);
    /// the pairs are put in the order the router emits them (by expert, then token); weights are
    /// recomputed from the live scores.
    pub fn replay_pairs(cfg: &ModelConfig, layers: &[usize], pairs: &[Vec<(u32, u32)>], device: &candle_core::Device) -> Result<Self> {
        if layers.len() != pairs.len() {
            return Err(ModelError::batch("routes", format!("{} layers but pairs for {}", layers.len(), pairs.len())));
        }
        let mut plan = Self::record();
        for (&layer, p) in layers.iter().zip(pairs) {
            if cfg.moe.router.strategy == crate::config::RoutingStrategy::TokenChoice {
                return Err(ModelError::routing(layer, "variable-width route rows on a token-choice router (top-k rows have k experts each)"));
            }
            plan = plan.with_layer(layer, RouteMode::Replay(assignments_replay(p, device)?));
        }
        Ok(plan)
    }

    /// Set one layer's mode (decoder layer index).
    pub fn with_layer(mut self, layer: usize, mode: RouteMode) -> Self {
        self.layers.insert(layer, mode);
        self
    }

    pub fn mode(&self, layer: usize) -> &RouteMode {
        const COMPUTE: RouteMode = RouteMode::Compute;
        const RECORD: RouteMode = RouteMode::Record;
        match self.layers.get(&layer) {
            Some(m) => m,
            None if self.record_by_default => &RECORD,
            None => &COMPUTE,
        }
    }

    /// Check the plan against the model and the batch before any compute: every keyed layer is
    /// an MoE layer; forced routes fit the batch, the router's kind and the expert count.
    pub fn validate(&self, cfg: &ModelConfig, num_slots: usize) -> Result<()> {
        let mut on_device = Vec::new();
        for (&layer, mode) in &self.layers {
            if !cfg.is_moe_layer(layer) {
                let why = if layer >= cfg.num_layers {
                    format!("the model has {} layers", cfg.num_layers)
                } else {
                    format!("layer {layer} is dense; MoE layers are {:?}", cfg.moe_layers)
                };
                return Err(ModelError::routing(layer, format!("not an MoE layer: {why}")));
            }
            if let RouteMode::Replay(r) = mode {
                validate_shape(r, cfg, num_slots, layer)?;
                if forced_on_cuda(r) {
                    on_device.push((layer, r));
                } else {
                    validate_ids(r, cfg, num_slots, layer)?;
                }
            }
        }
        // routes on the GPU are checked there, all layers with one copy back; a faulty layer is
        // then re-checked on the host for the message
        if let Some(&layer) = faulty_on_device(&on_device, cfg, num_slots)?.first() {
            let (_, r) = on_device.iter().find(|(l, _)| *l == layer).expect("checked layer");
            validate_ids(r, cfg, num_slots, layer)?;
            return Err(ModelError::routing(layer, "the forced route failed the device checks"));
        }
        Ok(())
    }
}

/// A live-weight replay of (token, expert) pairs, put in the order the expert-choice router
/// emits its assignments (by expert, then token).
fn assignments_replay(pairs: &[(u32, u32)], device: &candle_core::Device) -> Result<Replay> {
    let mut by_expert: Vec<(u32, u32)> = pairs.iter().map(|&(t, e)| (e, t)).collect();
    by_expert.sort_unstable();
    let (expert_A, token_A): (Vec<u32>, Vec<u32>) = by_expert.into_iter().unzip();
    let a = token_A.len();
    Ok(Replay {
        route: ForcedRoute::Assignments { token_A: Tensor::from_vec(token_A, a, device)?, expert_A: Tensor::from_vec(expert_A, a, device)? },
        weights: ReplayWeights::Recompute,
    })
}

fn forced_on_cuda(r: &Replay) -> bool {
    match &r.route {
        ForcedRoute::TopK(t) => t.device().is_cuda(),
        ForcedRoute::Assignments { token_A, .. } => token_A.device().is_cuda(),
    }
}

/// Layers whose forced route (on the GPU) has a fault.
#[cfg(feature = "cuda")]
fn faulty_on_device(routes: &[(usize, &Replay)], cfg: &ModelConfig, num_slots: usize) -> Result<Vec<usize>> {
    use crate::gpu::route::{check_forced, Forced};
    let Some((_, first)) = routes.first() else { return Ok(Vec::new()) };
    let dev = match &first.route {
        ForcedRoute::TopK(t) => t.device().as_cuda_device()?.clone(),
        ForcedRoute::Assignments { token_A, .. } => token_A.device().as_cuda_device()?.clone(),
    };
    let mut owned = Vec::with_capacity(routes.len());
    for (_, r) in routes {
        owned.push(match &r.route {
            ForcedRoute::TopK(t) => (t.to_dtype(DType::U32)?.contiguous()?, None),
            ForcedRoute::Assignments { token_A, expert_A } => (
                token_A.to_dtype(DType::U32)?.flatten_all()?.contiguous()?,
                Some(expert_A.to_dtype(DType::U32)?.flatten_all()?.to_device(&candle_core::Device::Cuda(dev.clone()))?.contiguous()?),
            ),
        });
    }
    let forced: Vec<Forced<'_>> = owned
        .iter()
        .map(|(a, b)| match b {
            None => Forced::TopK(a),
            Some(b) => Forced::Pairs(a, b),
        })
        .collect();
    let counts = check_forced(&dev, &forced, num_slots, cfg.moe.router.num_experts)?;
    Ok(routes.iter().zip(counts).filter(|(_, c)| c.iter().any(|&x| x > 0)).map(|((l, _), _)| *l).collect())
}

#[cfg(not(feature = "cuda"))]
fn faulty_on_device(routes: &[(usize, &Replay)], _: &ModelConfig, _: usize) -> Result<Vec<usize>> {
    // without the feature no tensor is on a GPU; check on the host
    Ok(routes.iter().map(|(l, _)| *l).collect())
}

fn host_u32(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?)
}

/// Shapes and lengths of a forced route (metadata only: nothing is copied).
fn validate_shape(r: &Replay, cfg: &ModelConfig, num_slots: usize, layer: usize) -> Result<()> {
    let token_choice = cfg.moe.router.strategy == crate::config::RoutingStrategy::TokenChoice;
    let bad = |msg: String| Err(ModelError::routing(layer, msg));
    let num_assignments = match &r.route {
        ForcedRoute::TopK(ids_NK) => {
            if !token_choice {
                return bad("a top-k replay on an expert-choice router; replay its assignments".into());
            }
            let k = cfg.moe.router.top_k;
            let dims = ids_NK.dims();
            if dims != [num_slots, k] {
                return bad(format!("replay ids have shape {dims:?}, expected [{num_slots} tokens, {k} experts per token]"));
            }
            num_slots * k
        }
        ForcedRoute::Assignments { token_A, expert_A } => {
            if token_A.elem_count() != expert_A.elem_count() {
                return bad(format!("{} tokens but {} experts in the forced assignments", token_A.elem_count(), expert_A.elem_count()));
            }
            token_A.elem_count()
        }
    };
    if let ReplayWeights::Given(w) = &r.weights {
        if w.elem_count() != num_assignments {
            return bad(format!("replay weights have shape {:?}, expected {num_assignments} values (one per assignment)", w.dims()));
        }
    }
    Ok(())
}

/// The ids of a forced route, on the host: range, ROUTE_FREE rows, duplicates.
fn validate_ids(r: &Replay, cfg: &ModelConfig, num_slots: usize, layer: usize) -> Result<()> {
    let e = cfg.moe.router.num_experts;
    let bad = |msg: String| Err(ModelError::routing(layer, msg));
    match &r.route {
        ForcedRoute::TopK(ids_NK) => {
            let k = cfg.moe.router.top_k;
            for (n, row) in host_u32(ids_NK)?.chunks(k).enumerate() {
                let free = row.iter().filter(|&&i| i == ROUTE_FREE).count();
                if free == k {
                    continue;
                }
                if free > 0 {
                    return bad(format!("token {n}: row mixes ROUTE_FREE with expert ids"));
                }
                if let Some(&x) = row.iter().find(|&&i| i as usize >= e) {
                    return bad(format!("token {n}: expert id {x} >= num_experts {e}"));
                }
                if let Some((a, &x)) = row.iter().enumerate().find(|(a, x)| row[..*a].contains(x)) {
                    return bad(format!("token {n}: expert {x} selected twice (slot {a})"));
                }
            }
        }
        ForcedRoute::Assignments { token_A, expert_A } => {
            let (t, x) = (host_u32(token_A)?, host_u32(expert_A)?);
            let mut seen = std::collections::HashSet::new();
            for (a, (&tok, &ex)) in t.iter().zip(&x).enumerate() {
                if tok as usize >= num_slots {
                    return bad(format!("assignment {a}: token {tok} >= {num_slots} tokens in the batch"));
                }
                if ex as usize >= e {
                    return bad(format!("assignment {a}: expert id {ex} >= num_experts {e}"));
                }
                if !seen.insert((tok, ex)) {
                    return bad(format!("assignment {a}: token {tok} given to expert {ex} twice"));
                }
            }
        }
    }
    Ok(())
}
