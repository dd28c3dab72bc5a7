//! Routing health of one recorded layer, over real (non-padding) tokens:
//! - routing confidence, per token then averaged: softmax routers Σ_selected p (the selected
//!   full-softmax mass, before renormalisation); sigmoid routers Σ_selected s / Σ_all s;
//! - tokens per expert (load) and max_vio = (max load − mean load) / mean load ([`max_vio`]);
//!   prime-rl's variant, which counts padding and drops the top-k loads, is [`max_vio_prime_rl`];
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

/// One recorded layer's route on the host: what [`layer_health_of`] and [`slot_load_of`] read,
/// copied off the device once ([`HostRoute::of`]) so that the arithmetic can run anywhere (the
/// trainer runs its layers' in parallel).
#[derive(Debug, Clone, PartialEq)]
pub struct HostRoute {
    pub num_tokens: usize,
    pub num_experts: usize,
    /// (token, expert) per assignment
    pub tok: Vec<u32>,
    pub exp: Vec<u32>,
    /// the router probability (softmax) or score (sigmoid) of each assignment
    pub probs: Vec<f32>,
    /// sigmoid routers: Σ over all experts of each token's scores
    pub totals: Option<Vec<f32>>,
}

impl HostRoute {
    pub fn of(route: &LayerRoute, score: ScoreFunction) -> Result<Self> {
        let (tok, exp) = route.pairs()?;
        let probs: Vec<f32> = route.prob_A.to_dtype(DType::F32)?.to_vec1()?;
        let totals = match score {
            ScoreFunction::Softmax => None,
            ScoreFunction::Sigmoid => Some(route.scores_NE.sum(1)?.to_vec1()?),
        };
        Ok(Self { num_tokens: route.num_tokens, num_experts: route.scores_NE.dim(1)?, tok, exp, probs, totals })
    }
}

pub fn layer_health(route: &LayerRoute, real: &[bool], score: ScoreFunction) -> Result<LayerHealth> {
    Ok(layer_health_of(&HostRoute::of(route, score)?, real))
}

/// [`layer_health`] of a route on the host.
pub fn layer_health_of(route: &HostRoute, real: &[bool]) -> LayerHealth {
    let e = route.num_experts;
    let mut load = vec![0usize; e];
    let mut selected = vec![0f64; real.len()];
    let mut count = vec![0usize; real.len()];
    for ((&t, &x), &p) in route.tok.iter().zip(&route.exp).zip(&route.probs) {
        let t = t as usize;
        if real.get(t).copied().unwrap_or(false) && (x as usize) < e {
            load[x as usize] += 1;
            selected[t] += p as f64;
            count[t] += 1;
        }
    }
    let (mut tokens, mut conf, mut dropped, mut experts) = (0usize, 0f64, 0usize, 0usize);
    for (n, &is_real) in real.iter().enumerate() {
        if !is_real {
            continue;
        }
        tokens += 1;
        experts += count[n];
        dropped += usize::from(count[n] == 0);
        conf += match &route.totals {
            None => selected[n],
            Some(t) if t.get(n).is_some_and(|&t| t > 0.0) => selected[n] / t[n] as f64,
            Some(_) => 0.0,
        };
    }
    let per = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };
    LayerHealth {
        tokens,
        confidence: per(conf),
        max_vio: max_vio(&load),
        load,
        dropped: per(dropped as f64),
        mean_experts_per_token: per(experts as f64),
    }
}

/// lockstep's max_vio of one layer: with c_e = tokens routed to expert e over the *real*
/// (non-padding) token slots (as [`layer_health`] counts them) and all E experts,
///
///   max_vio = (max_e c_e − mean_e c_e) / mean_e c_e,   mean_e c_e = Σ_e c_e / E;
///
/// 0 when nothing was routed. (Load-balancing violation as in DeepSeek's auxiliary-loss-free
/// balancing, arXiv 2408.15664.) prime-rl logs a different number: [`max_vio_prime_rl`].
pub fn max_vio(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if total == 0 || load.is_empty() {
        return 0.0;
    }
    let mean = total as f64 / load.len() as f64;
    let max = *load.iter().max().unwrap_or(&0) as f64;
    (max - mean) / mean
}

/// max_vio exactly as prime-rl logs it: `get_load_balance_stats` in
/// `src/prime_rl/trainer/model.py` of PrimeIntellect-ai/prime-rl (commit 559b447, lines
/// 561–591, the cut at 574–575, the formula at 576–577; the padding cut came with PR #1332,
/// PR #2545 kept it and made the per-layer values tensors). With c_e = `tokens_per_expert`,
/// which prime-rl's `MoE.forward` (`src/prime_rl/trainer/models/layers/moe.py`, 1012–1013)
/// accumulates as `histc` of the selected expert ids over *every* token of the micro-batch
/// forward — padding (`pad_micro_batch` in `trainer/batch.py`), prompt and completion alike, no
/// mask — and k = `router.top_k`:
///
///   c' = c sorted descending with its k largest entries dropped
///        (`try_to_avoid_padding_experts`, on by default: a micro-batch's padding tokens share one
///        hidden state, so they all land on the same k experts and would inflate them),
///   max_vio = (max c' − mean c') / mean c',   mean c' = Σ c' / (E − k).
///
/// So max c' is the (k+1)-th largest load, and the mean leaves the k busiest experts out.
/// `load_all_slots` must count every token slot of one micro-batch forward, padding included
/// ([`slot_load`]), per MoE layer; prime-rl logs one value per layer and micro-step and reports
/// `max_vio/mean` over layers × micro-steps × ranks. Computed in f64 (prime-rl: f32 buffers).
/// NaN where prime-rl's arithmetic is undefined: mean c' = 0 (torch's 0/0) or E ≤ k (empty c',
/// where torch's `max` raises).
pub fn max_vio_prime_rl(load_all_slots: &[usize], top_k: usize) -> f64 {
    if load_all_slots.len() <= top_k {
        return f64::NAN;
    }
    let mut c = load_all_slots.to_vec();
    c.sort_unstable_by(|a, b| b.cmp(a));
    let kept = &c[top_k..];
    let mean = kept.iter().sum::<usize>() as f64 / kept.len() as f64;
    let max = kept[0] as f64; // sorted descending
    (max - mean) / mean
}

/// Tokens per expert over every token slot of a route, padding slots included — the load
/// prime-rl's [`max_vio_prime_rl`] is defined on ([`layer_health`] counts real slots only).
pub fn slot_load(route: &LayerRoute) -> Result<Vec<usize>> {
    let (_, exp) = route.pairs()?;
    slot_load_of(&exp, route.scores_NE.dim(1)?)
}

/// [`slot_load`] of a route's expert ids on the host, `e` experts.
pub fn slot_load_of(exp: &[u32], e: usize) -> Result<Vec<usize>> {
    let mut load = vec![0usize; e];
    for &x in exp {
        match load.get_mut(x as usize) {
            Some(c) => *c += 1,
            None => return Err(candle_core::Error::Msg(format!("slot_load: expert id {x} >= {e} experts")).into()),
        }
    }
    Ok(load)
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// 8 token slots, the last 2 padding; 4 experts, top-2. Padding rows share one hidden state
    /// and route alike, here both to {0, 1}.
    fn route() -> (LayerRoute, Vec<bool>) {
        let dev = Device::Cpu;
        let ids: [[u32; 2]; 8] = [[0, 2], [0, 3], [1, 2], [2, 3], [0, 1], [2, 3], [0, 1], [0, 1]];
        let tok: Vec<u32> = (0..8u32).flat_map(|t| [t, t]).collect();
        let exp: Vec<u32> = ids.iter().flatten().copied().collect();
        let a = exp.len();
        let scores = Tensor::full(0.25f32, (8, 4), &dev).unwrap();
        let r = LayerRoute {
            num_tokens: 8,
            top_k: Some(2),
            token_A: Tensor::from_vec(tok, a, &dev).unwrap(),
            expert_A: Tensor::from_vec(exp, a, &dev).unwrap(),
            prob_A: Tensor::full(0.25f32, a, &dev).unwrap(),
            weight_A: Tensor::full(0.5f32, a, &dev).unwrap(),
            logits_NE: scores.clone(),
            scores_NE: scores,
        };
        (r, [vec![true; 6], vec![false; 2]].concat())
    }

    #[test]
    fn max_vio_and_prime_rl_max_vio_differ_by_hand() {
        let (r, real) = route();
        // real slots: e0 {t0, t1, t4} = 3, e1 {t2, t4} = 2, e2 {t0, t2, t3, t5} = 4, e3 {t1, t3, t5} = 3
        let h = layer_health(&r, &real, ScoreFunction::Softmax).unwrap();
        assert_eq!(h.load, vec![3, 2, 4, 3]);
        // ours: mean 12 / 4 = 3, max 4 → 1/3
        assert!((h.max_vio - 1.0 / 3.0).abs() < 1e-12);
        // every slot (prime-rl counts padding): + 2 on e0 and e1 → [5, 4, 4, 3]
        let all = slot_load(&r).unwrap();
        assert_eq!(all, vec![5, 4, 4, 3]);
        // prime-rl: sorted [5, 4, 4, 3], drop top-2 → [4, 3]: mean 3.5, max 4 → 0.5 / 3.5 = 1/7
        assert!((max_vio_prime_rl(&all, 2) - 1.0 / 7.0).abs() < 1e-12);
        // the two differences one at a time: padding counted, no cut → (5 − 4) / 4
        assert!((max_vio(&all) - 0.25).abs() < 1e-12);
        // the cut on real slots only: [4, 3, 3, 2] → [3, 2]: (3 − 2.5) / 2.5
        assert!((max_vio_prime_rl(&h.load, 2) - 0.2).abs() < 1e-12);
        // a perfectly balanced layer is 0 in both
        assert_eq!((max_vio(&[4, 4, 4, 4]), max_vio_prime_rl(&[4, 4, 4, 4], 2)), (0.0, 0.0));
        // k hot experts alone (e.g. all padding): ours sees them, prime-rl's cut hides them
        assert_eq!(max_vio(&[9, 9, 1, 1]), 0.8);
        assert_eq!(max_vio_prime_rl(&[9, 9, 1, 1], 2), 0.0);
        // undefined in prime-rl (0 / 0, or nothing left after the cut): NaN; ours says 0
        assert!(max_vio_prime_rl(&[0, 0, 0, 0], 2).is_nan());
        assert!(max_vio_prime_rl(&[3, 1], 2).is_nan());
        assert_eq!(max_vio(&[0, 0, 0, 0]), 0.0);
    }

    #[test]
    fn slot_load_refuses_an_out_of_range_expert() {
        let (mut r, _) = route();
        r.expert_A = Tensor::from_vec(vec![7u32; 16], 16, &Device::Cpu).unwrap();
        assert!(slot_load(&r).unwrap_err().to_string().contains("expert id 7"));
    }
}
