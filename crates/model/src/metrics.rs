//! Routing health of one recorded layer, over real (non-padding) tokens:
//! - routing confidence, per token then averaged: softmax routers Σ_selected p (the selected
//!   full-softmax mass, before renormalisation); sigmoid routers Σ_selected s / Σ_all s;
//! - tokens per expert (load) and max_vio = (max load − mean load) / mean load;
//! - expert choice: share of tokens no expert took, mean experts per token;
//! - route agreement between two routes: share of tokens whose expert *sets* are equal.

use candle_core::DType;

use crate::config::ScoreFunction;
use crate::error::Result;
use crate::routing::LayerRoute;

#[derive(Debug, Clone, PartialEq)]
pub struct LayerHealth {
    pub tokens: usize,
    pub confidence: f64,
    pub load: Vec<usize>,
    pub max_vio: f64,
    /// share of real tokens with no expert (0 under token choice)
    pub dropped: f64,
    pub mean_experts_per_token: f64,
}

pub fn layer_health(route: &LayerRoute, real: &[bool], score: ScoreFunction) -> Result<LayerHealth> {
    let e = route.scores_NE.dim(1)?;
    let (tok, exp) = route.pairs()?;
    let probs: Vec<f32> = route.prob_A.to_dtype(DType::F32)?.to_vec1()?;
    let mut load = vec![0usize; e];
    let mut selected = vec![0f64; real.len()];
    let mut count = vec![0usize; real.len()];
    for ((&t, &x), &p) in tok.iter().zip(&exp).zip(&probs) {
        if real[t as usize] {
            load[x as usize] += 1;
            selected[t as usize] += p as f64;
            count[t as usize] += 1;
        }
    }
    let totals: Option<Vec<f32>> = match score {
        ScoreFunction::Softmax => None,
        ScoreFunction::Sigmoid => Some(route.scores_NE.sum(1)?.to_vec1()?),
    };
    let (mut tokens, mut conf, mut dropped, mut experts) = (0usize, 0f64, 0usize, 0usize);
    for (n, &is_real) in real.iter().enumerate() {
        if !is_real {
            continue;
        }
        tokens += 1;
        experts += count[n];
        dropped += usize::from(count[n] == 0);
        conf += match &totals {
            None => selected[n],
            Some(t) if t[n] > 0.0 => selected[n] / t[n] as f64,
            Some(_) => 0.0,
        };
    }
    let per = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };
    Ok(LayerHealth {
        tokens,
        confidence: per(conf),
        max_vio: max_vio(&load),
        load,
        dropped: per(dropped as f64),
        mean_experts_per_token: per(experts as f64),
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

/// Expert set of every token slot.
fn sets(route: &LayerRoute) -> Result<Vec<Vec<u32>>> {
    let (tok, exp) = route.pairs()?;
    let mut s = vec![Vec::new(); route.num_tokens];
    for (&t, &x) in tok.iter().zip(&exp) {
        s[t as usize].push(x);
    }
    for v in &mut s {
        v.sort_unstable();
    }
    Ok(s)
}

/// Share of real tokens whose selected expert sets agree between two routes of one layer.
pub fn route_agreement(a: &LayerRoute, b: &LayerRoute, real: &[bool]) -> Result<f64> {
    let (sa, sb) = (sets(a)?, sets(b)?);
    let (mut same, mut total) = (0usize, 0usize);
    for (n, &is_real) in real.iter().enumerate() {
        if is_real {
            total += 1;
            same += usize::from(sa[n] == sb[n]);
        }
    }
    Ok(if total == 0 { 1.0 } else { same as f64 / total as f64 })
}
