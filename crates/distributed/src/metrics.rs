//! Routing health over all ranks: each rank measures its own tokens (`layer_health`), the
//! ranks exchange the sums, and every rank gets the values of the global batch:
//! tokens and tokens per expert are summed, confidence, dropped share and experts per token
//! are token-weighted means, `max_vio` is recomputed from the summed loads (the value one GPU
//! would report for the whole batch), and `max_vio_rank_max` is the largest per-rank value
//! (the worst imbalance any one rank saw).

use lockstep_collective::{Collective, CollectiveError};
use lockstep_model::metrics::{max_vio, LayerHealth};
use lockstep_model::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct GlobalHealth {
    pub health: LayerHealth,
    pub max_vio_rank_max: f64,
}

pub fn reduce_health(comm: &dyn Collective, local: &LayerHealth) -> Result<GlobalHealth> {
    let t = local.tokens as f64;
    let mut v = vec![t, local.confidence * t, local.dropped * t, local.mean_experts_per_token * t, local.max_vio];
    v.extend(local.load.iter().map(|&x| x as f64));
    let all = comm.all_gather_host(&v)?;
    let e = local.load.len();
    let mut sum = vec![0f64; 4 + e];
    let mut rank_max = 0f64;
    for r in &all {
        if r.len() != v.len() {
            return Err(CollectiveError::Mismatch(format!("reduce_health: a rank sent {} values, {} expected", r.len(), v.len())).into());
        }
        for (i, x) in r[..4].iter().enumerate() {
            sum[i] += x;
        }
        for (i, x) in r[5..].iter().enumerate() {
            sum[4 + i] += x;
        }
        rank_max = rank_max.max(r[4]);
    }
    let tokens = sum[0];
    let per = |x: f64| if tokens == 0.0 { 0.0 } else { x / tokens };
    let load: Vec<usize> = sum[4..].iter().map(|&x| x as usize).collect();
    Ok(GlobalHealth {
        health: LayerHealth {
            tokens: tokens as usize,
            confidence: per(sum[1]),
            max_vio: max_vio(&load),
            load,
            dropped: per(sum[2]),
            mean_experts_per_token: per(sum[3]),
        },
        max_vio_rank_max: rank_max,
    })
}
