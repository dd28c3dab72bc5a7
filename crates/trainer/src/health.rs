//! Routing health over a step: per MoE layer, the token-weighted sums (confidence, route
//! agreement, load, prime-rl's max_vio) each micro-batch adds ([`accumulate_health`]) and the
//! trainer reduces over ranks and divides at the end of the step. Each layer's route is copied
//! to the host once (`HostRoute`), then the layers' arithmetic runs in parallel.

use std::collections::BTreeMap;

use lockstep_model::metrics::{layer_health_of, max_vio_prime_rl, slot_load_of, HostRoute};
use lockstep_model::{MoeCausalLm, Recording};
use rayon::prelude::*;

use crate::batch::TrainBatch;
use crate::error::Result;
use crate::step_inputs::{agreement_of, free_pairs};

/// Per MoE layer over a step: token-weighted sums of confidence and agreement, tokens, load.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerAcc {
    pub(crate) confidence: f64,
    pub(crate) agreement: f64,
    /// routes compared for agreement
    pub(crate) compared: f64,
    pub(crate) tokens: f64,
    pub(crate) load: Vec<f64>,
    /// max_vio of this rank's load, the maximum over the ranks after the reduction
    pub(crate) rank_max_vio: f64,
    /// Σ and count of prime-rl's max_vio over micro-batches where it is defined
    pub(crate) prime_sum: f64,
    pub(crate) prime_count: f64,
}

/// lockstep's max_vio of a summed load.
pub(crate) fn load_max_vio(load: &[f64]) -> f64 {
    lockstep_model::metrics::max_vio(&load.iter().map(|&x| x as usize).collect::<Vec<_>>())
}

/// Add one micro-batch's routing health (the routes its forward applied) into `layer_acc`.
pub(crate) fn accumulate_health(model: &MoeCausalLm, routes: &Recording, tb: &TrainBatch, layer_acc: &mut BTreeMap<usize, LayerAcc>) -> Result<()> {
    let real = tb.batch.real_mask();
    let score = model.cfg.moe.router.score_function;
    let top_k = model.cfg.moe.router.top_k;
    // each layer's route and free selection copied to the host here, then the routing
    // health of every layer computed in parallel (host arithmetic only)
    let host = routes
        .iter()
        .map(|(&l, r)| Ok((l, HostRoute::of(r, score)?, free_pairs(model, l, r, &tb.batch)?)))
        .collect::<Result<Vec<_>>>()?;
    let health = host
        .par_iter()
        .map(|(l, h, free)| {
            let (same, compared) = agreement_of(*l, &real, free, h, tb)?;
            let prime = max_vio_prime_rl(&slot_load_of(&h.exp, h.num_experts)?, top_k);
            Ok((*l, layer_health_of(h, &real), same, compared, prime))
        })
        .collect::<Result<Vec<_>>>()?;
    for (l, h, same, compared, prime) in health {
        let e = layer_acc.entry(l).or_default();
        if prime.is_finite() {
            e.prime_sum += prime;
            e.prime_count += 1.0;
        }
        let w = h.tokens as f64;
        e.confidence += h.confidence * w;
        e.agreement += same;
        e.compared += compared;
        e.tokens += w;
        e.load.resize(h.load.len(), 0.0);
        for (a, &x) in e.load.iter_mut().zip(&h.load) {
            *a += x as f64;
        }
    }
    Ok(())
}
