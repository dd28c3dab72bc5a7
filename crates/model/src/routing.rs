//! Routing modes, passed into the forward per MoE layer (keyed by decoder layer index):
//! compute, record, or replay a recorded route. This file holds the plan and the record; the
//! router (`moe::router`) carries them out.
//!
//! Replay follows R3 / Megatron semantics: the expert ids are forced; with
//! [`ReplayWeights::Recompute`] the weights are the *live* router probabilities gathered at the
//! forced ids (renormalised iff `norm_topk_prob`), so the router still receives gradients; with
//! [`ReplayWeights::Given`] the supplied weights are applied verbatim.
//!
//! A replay row whose ids are all [`ROUTE_FREE`] routes freely (padding slots of a packed
//! micro-batch, or tokens whose route a foreign engine did not provide).
//!
//! Legend: N token slots (B*T, batch-major), K experts per token, E experts.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Expert id that marks a replay row as "route freely".
pub const ROUTE_FREE: u32 = u32::MAX;

/// Where replayed weights come from.
#[derive(Debug, Clone)]
pub enum ReplayWeights {
    /// Live router probabilities gathered at the forced ids (router gets gradients).
    Recompute,
    /// These [N, K] weights, applied verbatim.
    Given(Tensor),
}

/// A forced route for one MoE layer.
#[derive(Debug, Clone)]
pub struct Replay {
    /// [N, K] u32 expert ids in selection order; a row of all [`ROUTE_FREE`] routes freely.
    pub ids_NK: Tensor,
    pub weights: ReplayWeights,
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

/// What one MoE layer decided, for every token slot of the batch.
#[derive(Debug, Clone)]
pub struct LayerRoute {
    /// [N, K] u32 selected experts in selection order (descending router probability).
    pub ids_NK: Tensor,
    /// [N, K] router probability of each selected expert (full softmax, before renormalisation).
    pub probs_NK: Tensor,
    /// [N, K] weight actually applied to each selected expert's output.
    pub weights_NK: Tensor,
    /// [N, E] the full router probability distribution.
    pub scores_NE: Tensor,
    /// [N, E] raw router logits (before the score function).
    pub logits_NE: Tensor,
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

    /// Replay every layer of a recording.
    pub fn replay(recording: &Recording, recompute_weights: bool) -> Self {
        let layers = recording
            .iter()
            .map(|(&l, r)| {
                let weights =
                    if recompute_weights { ReplayWeights::Recompute } else { ReplayWeights::Given(r.weights_NK.clone()) };
                (l, RouteMode::Replay(Replay { ids_NK: r.ids_NK.clone(), weights }))
            })
            .collect();
        Self { record_by_default: false, layers }
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
    /// an MoE layer, replay tensors are [N, K], ids are < E (or a whole free row).
    pub fn validate(&self, cfg: &ModelConfig, num_slots: usize) -> Result<()> {
        let e = cfg.moe.router.num_experts;
        let k = cfg.moe.router.top_k;
        for (&layer, mode) in &self.layers {
            if !cfg.is_moe_layer(layer) {
                let why = if layer >= cfg.num_layers {
                    format!("the model has {} layers", cfg.num_layers)
                } else {
                    format!("layer {layer} is dense; MoE layers are {:?}", cfg.moe_layers)
                };
                return Err(ModelError::routing(layer, format!("not an MoE layer: {why}")));
            }
            let RouteMode::Replay(r) = mode else { continue };
            let dims = r.ids_NK.dims();
            if dims != [num_slots, k] {
                return Err(ModelError::routing(
                    layer,
                    format!("replay ids have shape {dims:?}, expected [{num_slots} tokens, {k} experts per token]"),
                ));
            }
            let ids: Vec<u32> = r.ids_NK.to_dtype(candle_core::DType::U32)?.flatten_all()?.to_vec1()?;
            for (n, row) in ids.chunks(k).enumerate() {
                let free = row.iter().filter(|&&i| i == ROUTE_FREE).count();
                if free == k {
                    continue;
                }
                if free > 0 {
                    return Err(ModelError::routing(layer, format!("token {n}: row mixes ROUTE_FREE with expert ids")));
                }
                if let Some(&bad) = row.iter().find(|&&i| i as usize >= e) {
                    return Err(ModelError::routing(layer, format!("token {n}: expert id {bad} >= num_experts {e}")));
                }
                for (a, &x) in row.iter().enumerate() {
                    if row[..a].contains(&x) {
                        return Err(ModelError::routing(layer, format!("token {n}: expert {x} selected twice")));
                    }
                }
            }
            if let ReplayWeights::Given(w) = &r.weights {
                if w.dims() != [num_slots, k] {
                    return Err(ModelError::routing(
                        layer,
                        format!("replay weights have shape {:?}, expected [{num_slots}, {k}]", w.dims()),
                    ));
                }
            }
        }
        Ok(())
    }
}
