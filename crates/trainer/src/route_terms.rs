//! The route side of the loss: which route row a token's terms use, the log-probability of a
//! route, and the router-shift weight — each as the loss (`loss.rs`) consumes it, per slot.
//!
//! **Alignment.** The log-probability at slot n, log π(y_n), is computed by the forward at
//! position n − 1 (its logits predict y_n). The experts that computed it are route row n − 1
//! of every MoE layer. So every per-position route quantity q_pos is moved to slots by
//! `q_slot[n] = q_pos[n − 1]` where slot n has a prediction (same sequence), else 0. (Row n of a
//! sequence's last token affects no log-prob of the sample; the last prompt token's row
//! produced the first completion token.)
//!
//! **Route log-probability (`plackett_luce`)**, softmax routers: the probability of the ordered
//! top-k selection e_1..e_K drawn without replacement from the router distribution p:
//!
//! ```text
//! log P(e_1..e_K) = Σ_i [ log p(e_i) − log(1 − Σ_{j<i} p(e_j)) ]
//! ```
//!
//! computed in f32 in selection order (the running sum first, then the two logs), the same on
//! the trainer's live probabilities (with gradient) and the recorded ones, so that equal inputs
//! give equal bits. It needs the *full-softmax* probabilities of the selected experts, which
//! the route trace carries. Sigmoid routers (scores are not a distribution over experts, and the
//! trace carries only the selected experts' scores, not the normaliser Σ_e σ_e) and expert
//! choice (experts pick tokens: no per-token draw) have no such probability: the joint ratio is
//! refused for them, `router_shift` works for every router.
//!
//! **Router shift (RSPO, arXiv 2510.23027)**: a stop-gradient weight per token from how far the
//! router moved on the old policy's experts S_l(n) (the replayed ones):
//!
//! ```text
//! shift_n = mean_{l, e ∈ S_l(n)} | log g_θ,l(e | n) − log g_old,l(e | n) |
//! γ_n     = max(exp(−shift_n), floor)
//! ```
//!
//! with g the router scores (softmax probabilities or sigmoid scores, before renormalisation).
//! Rows without routes or old scores are left out of the mean; a token with none has γ = 1.
//!
//! Legend: N token slots, W experts per route row, E experts.

use candle_core::{DType, Tensor};
use lockstep_model::ROUTE_FREE;

use lockstep_trace::RouteTrace;
use crate::error::Result;

/// Smallest remaining mass 1 − Σ_{j<i} p(e_j) of the Plackett–Luce denominator (f32 rounding
/// can take it to 0 or below on a saturated router).
pub const PL_MIN_REST: f32 = 1e-30;

/// Per-position values → per-slot values: `out[n] = x[n − 1]` where `valid[n]`, else 0
/// (differentiable: an index_select, then a mask).
pub fn shift_to_slots(x_N: &Tensor, valid: &[bool]) -> Result<Tensor> {
    let idx: Vec<u32> = valid.iter().enumerate().map(|(n, &v)| if v { n as u32 - 1 } else { 0 }).collect();
    let idx = Tensor::from_vec(idx, valid.len(), x_N.device())?;
    let m: Vec<f32> = valid.iter().map(|&v| f32::from(u8::from(v))).collect();
    let m = Tensor::from_vec(m, valid.len(), x_N.device())?;
    Ok((x_N.index_select(&idx, 0)? * m)?)
}

/// Host form of [`shift_to_slots`]; `fill` where there is no previous position.
pub fn shift_host<T: Copy>(x: &[T], valid: &[bool], fill: T) -> Vec<T> {
    valid.iter().enumerate().map(|(n, &v)| if v { x[n - 1] } else { fill }).collect()
}

/// Plackett–Luce log-probability of one row of selected probabilities (selection order), in
/// the f32 operation order of [`plackett_luce_NW`].
pub fn plackett_luce(p: &[f32]) -> f32 {
    let mut cum = 0f32;
    let mut total = 0f32;
    for &pi in p {
        let rest = (1.0 - cum).max(PL_MIN_REST);
        total += pi.ln() - rest.ln();
        cum += pi;
    }
    total
}

/// [`plackett_luce`] for every row of `p_NW` (f32, with gradient): [N].
pub fn plackett_luce_NW(p_NW: &Tensor) -> Result<Tensor> {
    let (n, w) = p_NW.dims2()?;
    let p_NW = p_NW.to_dtype(DType::F32)?;
    let mut cum = Tensor::zeros(n, DType::F32, p_NW.device())?;
    let mut total = Tensor::zeros(n, DType::F32, p_NW.device())?;
    for i in 0..w {
        let pi = p_NW.narrow(1, i, 1)?.squeeze(1)?;
        let rest = (1.0 - &cum)?.maximum(PL_MIN_REST)?;
        total = (total + (pi.log()? - rest.log()?)?)?;
        cum = (cum + pi)?;
    }
    Ok(total)
}

/// One layer's ids of a route trace (layer index `li`) with free rows pointed at expert 0 (for
/// a gather), and per position whether the row is a real route: ([N, W] u32, [N]).
pub fn gather_ids(r: &RouteTrace, li: usize, device: &candle_core::Device) -> Result<(Tensor, Vec<bool>)> {
    let w = r.top_k().ok_or_else(|| crate::error::TrainError::input("routes", "variable-width route rows"))?;
    let ids: Vec<u32> = r.layer_ids_u32(li).unwrap_or_default().iter().map(|&i| if i == ROUTE_FREE { 0 } else { i }).collect();
    let real = (0..r.num_tokens()).map(|n| !r.is_missing(n)).collect();
    Ok((Tensor::from_vec(ids, (r.num_tokens(), w), device)?, real))
}

/// The router's scores [N, E] at a route's experts: [N, W] (gradient flows into the scores).
pub fn scores_at(scores_NE: &Tensor, ids_NW: &Tensor) -> Result<Tensor> {
    Ok(scores_NE.to_dtype(DType::F32)?.contiguous()?.gather(&ids_NW.contiguous()?, 1)?)
}

/// Where a route's experts sit in the router scores, for rows of any width (fixed top-k or
/// variable expert-choice rows): for every real row, in trace order, the flat index
/// `n · E + e` of each of its experts into `scores_NE`, with per-position row offsets (N + 1).
#[derive(Debug, Clone)]
pub struct RowIndex {
    pub flat: Vec<u32>,
    pub offsets: Vec<usize>,
    pub real: Vec<bool>,
}

impl RowIndex {
    /// Layer index `li` of `r`, for a router of `num_experts` experts.
    pub fn of(r: &RouteTrace, li: usize, num_experts: usize) -> Self {
        let n = r.num_tokens();
        let (mut flat, mut offsets, mut real) = (Vec::new(), Vec::with_capacity(n + 1), Vec::with_capacity(n));
        offsets.push(0);
        for t in 0..n {
            let row = r.row(t, li);
            real.push(row.is_some());
            flat.extend(row.unwrap_or(&[]).iter().map(|&e| (t * num_experts) as u32 + u32::from(e)));
            offsets.push(flat.len());
        }
        Self { flat, offsets, real }
    }

    /// The recorded probabilities of those experts, in the same order (`None` without them).
    pub fn recorded(r: &RouteTrace, li: usize) -> Option<Vec<f32>> {
        r.probs()?;
        Some((0..r.num_tokens()).flat_map(|t| r.row_probs(t, li).unwrap_or_default()).collect())
    }

    /// `scores_NE` at the route's experts: [A] (gradient flows into the scores).
    pub fn scores(&self, scores_NE: &Tensor) -> Result<Tensor> {
        let idx = Tensor::from_vec(self.flat.clone(), self.flat.len(), scores_NE.device())?;
        Ok(scores_NE.to_dtype(DType::F32)?.flatten_all()?.index_select(&idx, 0)?)
    }
}

/// Per position, the router-shift sum Σ_e |log g_θ(e) − log g_old(e)| and the number of terms,
/// accumulated over layers into `sum` / `count`; `g_theta` and `g_old` are aligned with `ix`
/// (rows where either side is missing or ≤ 0 are left out).
pub fn accumulate_shift(g_theta: &[f32], g_old: &[f32], ix: &RowIndex, sum: &mut [f64], count: &mut [f64]) {
    for (n, &r) in ix.real.iter().enumerate() {
        let span = ix.offsets[n]..ix.offsets[n + 1];
        if !r || span.is_empty() || span.end > g_old.len() {
            continue;
        }
        let (a, b) = (&g_theta[span.clone()], &g_old[span]);
        if a.iter().chain(b).any(|&x| x.is_nan() || x <= 0.0) {
            continue;
        }
        for (&x, &y) in a.iter().zip(b) {
            sum[n] += ((x as f64).ln() - (y as f64).ln()).abs();
            count[n] += 1.0;
        }
    }
}

/// γ per position from the accumulated shift (1 where nothing was accumulated).
pub fn shift_weights(sum: &[f64], count: &[f64], floor: f64) -> Vec<f32> {
    sum.iter().zip(count).map(|(&s, &c)| if c > 0.0 { (-s / c).exp().max(floor) as f32 } else { 1.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plackett_luce_by_hand() {
        // p = (0.5, 0.3): log 0.5 + log(0.3 / 0.5)
        let got = plackett_luce(&[0.5, 0.3]) as f64;
        let want = 0.5f64.ln() + (0.3f64 / 0.5).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // a route of every expert of a 3-expert softmax: the last pick is certain
        let p = [0.2f32, 0.5, 0.3];
        let want = 0.2f64.ln() + (0.5f64 / 0.8).ln() + (0.3f64 / 0.3).ln();
        assert!((plackett_luce(&p) as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn tensor_form_equals_host_form_bitwise() {
        let rows = [[0.41f32, 0.22, 0.13], [0.9, 0.05, 0.04], [0.34, 0.33, 0.32]];
        let t = Tensor::from_vec(rows.concat(), (3, 3), &candle_core::Device::Cpu).unwrap();
        let got: Vec<f32> = plackett_luce_NW(&t).unwrap().to_vec1().unwrap();
        for (g, r) in got.iter().zip(&rows) {
            assert_eq!(g.to_bits(), plackett_luce(r).to_bits());
        }
    }

    #[test]
    fn shift_moves_positions_to_the_next_slot_within_a_sequence() {
        let valid = [false, true, true, false, true];
        let x = Tensor::new(&[1f32, 2., 3., 4., 5.], &candle_core::Device::Cpu).unwrap();
        let got: Vec<f32> = shift_to_slots(&x, &valid).unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![0., 1., 2., 0., 4.]);
        assert_eq!(shift_host(&[1, 2, 3, 4, 5], &valid, 9), vec![9, 1, 2, 9, 4]);
    }

    #[test]
    fn router_shift_weight_by_hand() {
        let (mut s, mut c) = (vec![0.0; 2], vec![0.0; 2]);
        // position 0: |ln .5 − ln .25| = ln 2 and |ln .2 − ln .2| = 0 → mean ln 2 / 2
        let ix = RowIndex { flat: vec![0, 1], offsets: vec![0, 2, 2], real: vec![true, false] };
        accumulate_shift(&[0.5, 0.2], &[0.25, 0.2], &ix, &mut s, &mut c);
        let g = shift_weights(&s, &c, 0.1);
        assert!((g[0] as f64 - (-(2f64.ln()) / 2.0).exp()).abs() < 1e-6);
        assert_eq!(g[1], 1.0);
        // floored
        let g = shift_weights(&[100.0], &[1.0], 0.3);
        assert!((g[0] - 0.3).abs() < 1e-7);
    }
}
