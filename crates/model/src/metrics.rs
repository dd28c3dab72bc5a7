//! Routing health of one recorded layer, over real (non-padding) tokens:
//! - routing confidence: mean over tokens of Σ_k probs[n, k] (selected full-softmax mass);
//! - tokens per expert (load) and max_vio = (max load − mean load) / mean load;
//! - route agreement between two recordings: share of tokens whose expert *sets* are equal.

use candle_core::DType;

use crate::error::Result;
use crate::routing::LayerRoute;

#[derive(Debug, Clone, PartialEq)]
pub struct LayerHealth {
    pub tokens: usize,
    pub confidence: f64,
    pub load: Vec<usize>,
    pub max_vio: f64,
}

pub fn layer_health(route: &LayerRoute, real: &[bool]) -> Result<LayerHealth> {
    let e = route.scores_NE.dim(1)?;
    let k = route.ids_NK.dim(1)?;
    let ids: Vec<u32> = route.ids_NK.flatten_all()?.to_vec1()?;
    let probs: Vec<f32> = route.probs_NK.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut load = vec![0usize; e];
    let mut mass = 0f64;
    let mut tokens = 0usize;
    for (n, &is_real) in real.iter().enumerate() {
        if !is_real {
            continue;
        }
        tokens += 1;
        for j in 0..k {
            load[ids[n * k + j] as usize] += 1;
            mass += probs[n * k + j] as f64;
        }
    }
    Ok(LayerHealth {
        tokens,
        confidence: if tokens == 0 { 0.0 } else { mass / tokens as f64 },
        max_vio: max_vio(&load),
        load,
    })
}

/// (max load − mean load) / mean load; 0 when nothing was routed.
pub fn max_vio(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if total == 0 || load.is_empty() {
        return 0.0;
    }
    let mean = total as f64 / load.len() as f64;
    let max = *load.iter().max().unwrap_or(&0) as f64;
    (max - mean) / mean
}

/// Share of real tokens whose selected expert sets agree between two routes of one layer.
pub fn route_agreement(a: &LayerRoute, b: &LayerRoute, real: &[bool]) -> Result<f64> {
    let k = a.ids_NK.dim(1)?;
    let ia: Vec<u32> = a.ids_NK.flatten_all()?.to_vec1()?;
    let ib: Vec<u32> = b.ids_NK.flatten_all()?.to_vec1()?;
    let (mut same, mut total) = (0usize, 0usize);
    for (n, &is_real) in real.iter().enumerate() {
        if !is_real {
            continue;
        }
        total += 1;
        let mut ra = ia[n * k..(n + 1) * k].to_vec();
        let mut rb = ib[n * k..(n + 1) * k].to_vec();
        ra.sort_unstable();
        rb.sort_unstable();
        same += usize::from(ra == rb);
    }
    Ok(if total == 0 { 1.0 } else { same as f64 / total as f64 })
}
