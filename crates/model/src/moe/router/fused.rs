//! The token-choice router's arithmetic as three fused candle ops (CPU and CUDA, kernels in
//! `gpu/route.cu`), so that a layer's routing costs a handful of launches instead of a dozen,
//! and the engine and the trainer (which trains the router through these ops' backward) run
//! the very same code:
//!
//! - [`softmax`]: scores_NE = softmax(logits_NE) over the last dim, f32 (1 op instead of 5);
//! - [`topk_weights`]: (scores_NE, ids_NK) → probs_NK ‖ weights_NK as one [2, N, K] f32 tensor,
//!   the weight rule of `token_choice` (1 op instead of gather, sum, div and scale);
//! - [`token_map`]: token_A = a / K for every assignment a < N · K, filled on the ids' device
//!   (no host array uploaded per call).
//!
//! Softmax, per row x of E values (one CUDA warp per row, whatever E; the CPU follows the same
//! order): lane l (l < 32) takes the columns l, l + 32, l + 64, … in ascending order;
//! m = max over the row (NaN ignored: `f32::max`, CUDA `fmaxf`), e_i = exp(x_i − m), the lane's
//! partial sum of its e_i from 0 in column order, then the 32 partials summed by the xor
//! butterfly 16, 8, 4, 2, 1 (lane l adds lane l ⊕ o), out_i = e_i / s. A row's bits depend on
//! that row alone (batch-invariant); CPU and CUDA differ only in exp's last bit (libm vs
//! `expf`). Backward: dx = s ⊙ (g − Σ_j g_j s_j), from the saved output, in candle ops.
//!
//! Top-k weights, per row n: p_k = scores[n, ids[n, k]], S = ((0 + p_0) + p_1) + … in k order,
//! w_k = p_k / S (softmax routers with `norm_topk_prob`), p_k / (S + 1e-20) (sigmoid routers with
//! `norm_topk_prob`) or p_k (no renormalisation), then w_k · c when `routed_scaling_factor` c ≠ 1
//! (c and 1e-20 rounded to f32 first, as candle's affine does). Identical arithmetic on CPU and
//! CUDA. Backward to the scores (ids get none): dp_j = gp_j + (c · gw_j − Σ_k gw_k w_k) / S'
//! (S' the denominator) with renormalisation, dp_j = gp_j + c · gw_j without; scattered into
//! zeros [N, E] at the ids.
//!
//! Legend: N tokens, E experts, K experts per token, A = N · K assignments.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::config::{RouterConfig, ScoreFunction};

/// Lanes of the fixed softmax reduction (a CUDA warp).
const LANES: usize = 32;

/// scores = softmax(logits) over the last dim (module doc); `logits` f32, any rank ≥ 1.
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    if logits.dtype() != DType::F32 {
        candle_core::bail!("router softmax: logits must be f32, got {:?} {:?}", logits.dtype(), logits.dims());
    }
    if logits.rank() == 0 {
        candle_core::bail!("router softmax: logits must have a last dim, got a scalar");
    }
    logits.contiguous()?.apply_op1(Softmax)
}

/// One row's softmax in the documented order (module doc): `out` gets softmax(`x`).
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for &v in x {
        m = m.max(v); // max is order-free (NaN ignored), so the lane split needs no emulation
    }
    let mut part = [0f32; LANES];
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let e = (v - m).exp();
        *o = e;
        part[i % LANES] += e;
    }
    // the xor butterfly: at step o lane l < o holds part[l] + part[l + o] (as lane l ⊕ o does)
    let mut o = LANES / 2;
    while o > 0 {
        for l in 0..o {
            part[l] += part[l + o];
        }
        o /= 2;
    }
    let s = part[0];
    for v in out.iter_mut() {
        *v /= s;
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "router-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else { candle_core::bail!("router softmax: logits must be f32, got {:?}", s.dtype()) };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("router softmax: logits must be contiguous") };
        let x = &v[a..b];
        let e = *l.dims().last().unwrap_or(&0);
        let mut out = vec![0f32; x.len()];
        if e > 0 {
            out.par_chunks_mut(e).zip(x.par_chunks(e)).for_each(|(o, xr)| softmax_row(xr, o));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::route::softmax(s, l)
    }

    fn bwd(&self, _logits: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(DType::F32)?;
        let gs = (res * &g)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * g.broadcast_sub(&gs)?)?))
    }
}

/// The denominator of the top-k weights (module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Renorm {
    /// w = p
    None,
    /// w = p / Σp (softmax routers)
    Sum,
    /// w = p / (Σp + eps) (sigmoid routers: eps = 1e-20)
    SumEps(f32),
}

/// How the top-k weights follow from the scores at the ids (module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightRule {
    pub renorm: Renorm,
    /// `routed_scaling_factor` (applied in f32 unless it is 1)
    pub scale: f64,
}

impl WeightRule {
    /// The rule of a token-choice router (`token_choice`'s module doc).
    pub fn of(cfg: &RouterConfig) -> Self {
        let renorm = match (cfg.norm_topk_prob, cfg.score_function) {
            (false, _) => Renorm::None,
            (true, ScoreFunction::Softmax) => Renorm::Sum,
            (true, ScoreFunction::Sigmoid) => Renorm::SumEps(1e-20),
        };
        Self { renorm, scale: cfg.routed_scaling_factor }
    }

    /// The scale as the ops apply it: None when it is exactly 1.
    fn scale_f32(&self) -> Option<f32> {
        (self.scale != 1.0).then_some(self.scale as f32)
    }

    /// The weights of one row's probs (module doc), written to `w`.
    pub fn apply_row(&self, p: &[f32], w: &mut [f32]) {
        let s = p.iter().fold(0f32, |s, &v| s + v);
        let den = match self.renorm {
            Renorm::None => None,
            Renorm::Sum => Some(s),
            Renorm::SumEps(eps) => Some(s + eps),
        };
        let c = self.scale_f32();
        for (w, &v) in w.iter_mut().zip(p) {
            let x = match den {
                Some(d) => v / d,
                None => v,
            };
            *w = match c {
                Some(c) => x * c,
                None => x,
            };
        }
    }
}

/// (scores_NE f32, ids_NK u32) → (probs_NK, weights_NK) f32, one op (module doc); the two are
/// the halves of one contiguous [2, N, K] tensor, so both stay contiguous.
pub fn topk_weights(scores_NE: &Tensor, ids_NK: &Tensor, rule: WeightRule) -> Result<(Tensor, Tensor)> {
    let both = topk_weights_2NK(scores_NE, ids_NK, rule)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The [2, N, K] output of [`topk_weights`]: probs_NK then weights_NK.
pub fn topk_weights_2NK(scores_NE: &Tensor, ids_NK: &Tensor, rule: WeightRule) -> Result<Tensor> {
    let (Ok((n, _)), Ok((n_ids, _))) = (scores_NE.dims2(), ids_NK.dims2()) else {
        candle_core::bail!("router top-k weights: scores {:?} and ids {:?} must be [N, E] and [N, K]", scores_NE.dims(), ids_NK.dims());
    };
    if n != n_ids {
        candle_core::bail!("router top-k weights: scores {:?} and ids {:?} disagree on N", scores_NE.dims(), ids_NK.dims());
    }
    if scores_NE.dtype() != DType::F32 || ids_NK.dtype() != DType::U32 {
        candle_core::bail!("router top-k weights: scores must be f32 and ids u32, got {:?} and {:?}", scores_NE.dtype(), ids_NK.dtype());
    }
    scores_NE.contiguous()?.apply_op2(&ids_NK.contiguous()?, TopKWeights { rule })
}

struct TopKWeights {
    rule: WeightRule,
}

impl CustomOp2 for TopKWeights {
    fn name(&self) -> &'static str {
        "router-topk-weights"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, e) = l1.shape().dims2()?;
        let k = l2.shape().dims2()?.1;
        let (CpuStorage::F32(sv), CpuStorage::U32(iv)) = (s1, s2) else {
            candle_core::bail!("router top-k weights: scores must be f32 and ids u32, got {:?} and {:?}", s1.dtype(), s2.dtype())
        };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("router top-k weights: scores and ids must be contiguous")
        };
        let (scores, ids) = (&sv[a1..b1], &iv[a2..b2]);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= e) {
            candle_core::bail!("router top-k weights: expert id {bad} out of range for {e} experts");
        }
        let mut out = vec![0f32; 2 * n * k];
        let (probs, weights) = out.split_at_mut(n * k);
        if k > 0 {
            for (r, (p, w)) in probs.chunks_mut(k).zip(weights.chunks_mut(k)).enumerate() {
                for (p, &i) in p.iter_mut().zip(&ids[r * k..(r + 1) * k]) {
                    *p = scores[r * e + i as usize];
                }
                self.rule.apply_row(p, w);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((2, n, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (renorm, eps) = match self.rule.renorm {
            Renorm::None => (0, 0.0),
            Renorm::Sum => (1, 0.0),
            Renorm::SumEps(eps) => (2, eps),
        };
        crate::gpu::route::topk_weights(s1, l1, s2, l2, renorm, eps, self.rule.scale_f32())
    }

    fn bwd(&self, scores_NE: &Tensor, ids_NK: &Tensor, res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(DType::F32)?;
        let (gp, gw) = (g.get(0)?, g.get(1)?);
        let c = self.rule.scale_f32().map_or(1.0, f64::from);
        let den = match self.rule.renorm {
            Renorm::None => None,
            Renorm::Sum => Some(res.get(0)?.sum_keepdim(1)?),
            Renorm::SumEps(eps) => Some((res.get(0)?.sum_keepdim(1)? + f64::from(eps))?),
        };
        let dp = match den {
            None => (gp + (gw * c)?)?,
            Some(den) => {
                let gw_w = (&gw * res.get(1)?)?.sum_keepdim(1)?;
                (gp + (gw * c)?.broadcast_sub(&gw_w)?.broadcast_div(&den)?)?
            }
        };
        let ds = Tensor::zeros(scores_NE.dims(), DType::F32, scores_NE.device())?.scatter_add(&ids_NK.contiguous()?, &dp.contiguous()?, 1)?;
        Ok((Some(ds), None))
    }
}

/// token_A [N · K] u32 = a / K for every assignment a (row-major ids_NK), made on the ids'
/// device without a host copy. `ids_NK` only lends its shape [N, K] and device (any dtype).
pub fn token_map(ids_NK: &Tensor) -> Result<Tensor> {
    let Ok((n, k)) = ids_NK.dims2() else { candle_core::bail!("router token map: ids must be [N, K], got {:?}", ids_NK.dims()) };
    if u32::try_from(n).is_err() || u32::try_from(n * k).is_err() {
        candle_core::bail!("router token map: {n} tokens x {k} exceed u32");
    }
    ids_NK.apply_op1_no_bwd(&TokenMap { n, k })
}

struct TokenMap {
    n: usize,
    k: usize,
}

impl CustomOp1 for TokenMap {
    fn name(&self) -> &'static str {
        "router-token-map"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = (self.n, self.k);
        let map = (0..n as u32).flat_map(|t| std::iter::repeat_n(t, k)).collect();
        Ok((CpuStorage::U32(map), Shape::from(n * k)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::route::token_map(s.device(), self.n, self.k)
    }
}
