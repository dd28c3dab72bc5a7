//! Causal self-attention with grouped-query heads, optional q/k/v bias, optional per-head
//! QK-RMSNorm, RoPE, and an additive mask that encodes padding and packed-sequence boundaries.
//!
//! Legend: B batch rows, T slots per row, D hidden, H query heads, G kv heads (groups),
//! R = H / G query heads per kv head, Dh head dim.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::linear::{linear_b, Linear};

use super::norm::RmsNorm;
use super::rope::RopeTables;
use super::varlen::{self, KeyLayout};
use super::Kernels;
use std::sync::Arc;
use crate::config::AttentionConfig;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    kernels: Kernels,
}

impl Attention {
    pub fn new(cfg: &AttentionConfig, hidden: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let (h, g, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (Some(RmsNorm::new(dh, eps, vb.pp("q_norm"))?), Some(RmsNorm::new(dh, eps, vb.pp("k_norm"))?))
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: linear_b(hidden, h * dh, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: linear_b(hidden, g * dh, cfg.qkv_bias, vb.pp("k_proj"))?,
            v_proj: linear_b(hidden, g * dh, cfg.qkv_bias, vb.pp("v_proj"))?,
            o_proj: linear_b(h * dh, hidden, cfg.o_bias, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            num_heads: h,
            num_kv_heads: g,
            head_dim: dh,
            kernels: Kernels::Autograd,
        })
    }

    pub fn set_kernels(&mut self, k: Kernels) {
        self.kernels = k;
        for l in [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.o_proj] {
            l.set_kernels(k);
        }
        for n in [&mut self.q_norm, &mut self.k_norm].into_iter().flatten() {
            n.set_kernels(k);
        }
    }

    /// Queries [B, H, T, Dh] and keys [B, G, T, Dh] (QK-norm, RoPE), values [B, G, T, Dh].
    fn project(&self, x_BTD: &Tensor, rope: &RopeTables) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x_BTD.dims3()?;
        let dh = self.head_dim;
        let heads = |proj: &Linear, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let x_BTND = proj.forward(x_BTD)?.reshape((b, t, n, dh))?;
            let x_BTND = match norm {
                Some(norm) => norm.forward(&x_BTND)?,
                None => x_BTND,
            };
            x_BTND.transpose(1, 2)?.contiguous()
        };
        let q_BHTD = rope.apply(&heads(&self.q_proj, self.num_heads, &self.q_norm)?)?;
        let k_BGTD = rope.apply(&heads(&self.k_proj, self.num_kv_heads, &self.k_norm)?)?;
        let v_BGTD = heads(&self.v_proj, self.num_kv_heads, &None)?;
        Ok((q_BHTD, k_BGTD, v_BGTD))
    }

    /// The q, k, v projections [B, T, n · Dh] (biases added). `fused`: the three products in one
    /// launch where the invariant kernels allow it (`matmul_nt3`: the same bits, no gradient —
    /// the engine's paged forward).
    fn projections(&self, x_BTD: &Tensor, fused: bool) -> Result<[Tensor; 3]> {
        let projs = [&self.q_proj, &self.k_proj, &self.v_proj];
        let three = match (fused, self.kernels) {
            (true, Kernels::Invariant) => super::invariant::matmul_nt3(x_BTD, projs.map(|p| p.weight()))?,
            _ => None,
        };
        Ok(match three {
            Some([q, k, v]) => [projs[0].add_bias(q)?, projs[1].add_bias(k)?, projs[2].add_bias(v)?],
            None => [self.q_proj.forward(x_BTD)?, self.k_proj.forward(x_BTD)?, self.v_proj.forward(x_BTD)?],
        })
    }

    /// Queries [B·T, H, Dh], keys and values [B·T, G, Dh] (QK-norm, RoPE) from the projections
    /// [B, T, n · Dh], in their token-major layout: no transposes (the rows the variable-length
    /// attention and the KV pool take). The same values as [`Self::project`]'s, transposed.
    fn rows([q, k, v]: [Tensor; 3], (b, t): (usize, usize), dh: usize, norms: [&Option<RmsNorm>; 2], rope: &RopeTables, (h, g): (usize, usize)) -> Result<(Tensor, Tensor, Tensor)> {
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let x_BTND = y.reshape((b, t, n, dh))?;
            match norm {
                Some(norm) => norm.forward(&x_BTND),
                None => Ok(x_BTND),
            }
        };
        let q_NHD = rope.apply_token_major(&heads(q, h, norms[0])?)?.reshape((b * t, h, dh))?;
        let k_NGD = rope.apply_token_major(&heads(k, g, norms[1])?)?.reshape((b * t, g, dh))?;
        let v_NGD = heads(v, g, &None)?.contiguous()?.reshape((b * t, g, dh))?;
        Ok((q_NHD, k_NGD, v_NGD))
    }

    /// [`Self::rows`] of [`Self::projections`].
    fn project_rows(&self, x_BTD: &Tensor, rope: &RopeTables, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x_BTD.dims3()?;
        let norms = [&self.q_norm, &self.k_norm];
        Self::rows(self.projections(x_BTD, fused)?, (b, t), self.head_dim, norms, rope, (self.num_heads, self.num_kv_heads))
    }

    /// x_BTD: [B, T, D] → [B, T, D] under the batch's attention layout.
    pub fn forward(&self, x_BTD: &Tensor, rope: &RopeTables, layout: &AttentionLayout) -> Result<Tensor> {
        let (b, t, _) = x_BTD.dims3()?;
        let (h, dh) = (self.num_heads, self.head_dim);
        let out_BHTD = match layout {
            AttentionLayout::Keys(keys) => {
                // the variable-length attention takes token-major rows: no transposes
                let (q_NHD, k_NGD, v_NGD) = self.project_rows(x_BTD, rope, false)?;
                let scale = 1.0 / (dh as f32).sqrt();
                let out = varlen::attention(&q_NHD, &k_NGD, &v_NGD, keys.clone(), scale)?.reshape((b, t, h * dh))?;
                return self.o_proj.forward(&out);
            }
            AttentionLayout::Dense(bias_B1TT) => {
                let (q_BHTD, k_BGTD, v_BGTD) = self.project(x_BTD, rope)?;
                self.attend(&q_BHTD, &k_BGTD, &v_BGTD, bias_B1TT)?
            }
            AttentionLayout::Runs(runs) => {
                let (q_BHTD, k_BGTD, v_BGTD) = self.project(x_BTD, rope)?;
                // packed row: each sequence attends only to itself, so compute it alone
                let outs = runs
                    .iter()
                    .map(|(start, len, bias)| {
                        let n = |x: &Tensor| x.narrow(2, *start, *len);
                        self.attend(&n(&q_BHTD)?, &n(&k_BGTD)?, &n(&v_BGTD)?, bias)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, 2)?
            }
        };
        let out_BTD = out_BHTD.transpose(1, 2)?.contiguous()?.reshape((b, t, h * dh))?;
        self.o_proj.forward(&out_BTD)
    }

    /// Attention for one packed row of new tokens over the paged KV cache: the new keys and
    /// values are written into the layer's pools `k_pool`, `v_pool` [R, G, Dh] at `slots` (one
    /// pool row per new token), then every new token attends to its sequence's keys as
    /// `layout` says (the batch-invariant attention, whatever the kernels: one launch for all
    /// sequences).
    pub(crate) fn forward_paged(&self, x_BTD: &Tensor, rope: &RopeTables, k_pool: &Tensor, v_pool: &Tensor, slots: &Tensor, layout: &Arc<KeyLayout>) -> Result<Tensor> {
        let (b, t, _) = x_BTD.dims3()?;
        let (h, dh) = (self.num_heads, self.head_dim);
        let (n, g) = (b * t, self.num_kv_heads);
        let qkv = self.projections(x_BTD, true)?;
        // QK-norm, RoPE and both pool writes in one launch where the engine's kernel applies
        let fused = match (&self.q_norm, &self.k_norm, self.kernels) {
            (Some(qn), Some(kn), Kernels::Invariant) => {
                let [q, k, v] = &qkv;
                super::paged_qk::norm_rope_write([&q.reshape((n, h, dh))?, &k.reshape((n, g, dh))?, &v.reshape((n, g, dh))?], (qn, kn), rope, (k_pool, v_pool), slots)?
            }
            _ => None,
        };
        let q_NHD = match fused {
            Some(q_NHD) => q_NHD,
            None => {
                let (q_NHD, k_NGD, v_NGD) = Self::rows(qkv, (b, t), dh, [&self.q_norm, &self.k_norm], rope, (h, g))?;
                super::kv_write::write_rows(k_pool, &k_NGD, slots)?;
                super::kv_write::write_rows(v_pool, &v_NGD, slots)?;
                q_NHD
            }
        };
        let scale = 1.0 / (dh as f32).sqrt();
        let out_NHD = varlen::attention(&q_NHD, k_pool, v_pool, layout.clone(), scale)?;
        self.o_proj.forward(&out_NHD.reshape((b, t, h * dh))?)
    }

    fn attend(&self, q_BHTD: &Tensor, k_BGTD: &Tensor, v_BGTD: &Tensor, bias_B1TT: &Tensor) -> Result<Tensor> {
        self.attend_rect(q_BHTD, k_BGTD, v_BGTD, bias_B1TT)
    }

    /// Scaled dot-product attention of q [B, H, T, Dh] over k, v [B, G, T, Dh] with an additive
    /// bias [B | 1, 1, T, T].
    /// (Tq queries over Tk keys; bias [B | 1, 1, Tq, Tk].)
    fn attend_rect(&self, q_BHTD: &Tensor, k_BGTD: &Tensor, v_BGTD: &Tensor, bias_B1TT: &Tensor) -> Result<Tensor> {
        let (b, h, t, dh) = q_BHTD.dims4()?;
        let tk = k_BGTD.dim(2)?;
        let g = self.num_kv_heads;
        let r = h / g;
        // Grouped-query attention without copying K/V: the R query heads of a group are stacked
        // along the query axis, so one batched matmul per group serves them all.
        let q_BG_RT_D = q_BHTD.contiguous()?.reshape((b, g, r * t, dh))?;
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = (q_BG_RT_D.matmul(&k_BGTD.t()?.contiguous()?)? * scale)?;
        let in_dtype = scores.dtype();
        let scores_BGRTT = scores.reshape((b, g, r, t, tk))?.to_dtype(DType::F32)?;
        let scores_BGRTT = scores_BGRTT.broadcast_add(&bias_B1TT.unsqueeze(1)?)?;
        let probs = match self.kernels {
            Kernels::Autograd | Kernels::Invariant => candle_nn::ops::softmax(&scores_BGRTT, D::Minus1)?,
            Kernels::Inference => candle_nn::ops::softmax_last_dim(&scores_BGRTT)?,
        };
        let probs_BG_RT_T = probs.to_dtype(in_dtype)?.reshape((b, g, r * t, tk))?;
        probs_BG_RT_T.matmul(&v_BGTD.contiguous()?)?.reshape((b, h, t, dh))
    }
}

/// How a batch's tokens see each other.
#[derive(Debug, Clone)]
pub enum AttentionLayout {
    /// Every slot's visible keys as a key table (the batch-invariant attention,
    /// `Kernels::Invariant`).
    Keys(Arc<KeyLayout>),
    /// [B, 1, T, T] additive bias (0 / -inf) over whole rows.
    Dense(Tensor),
    /// One packed row cut into runs (start, len, [1, 1, len, len] bias): a sequence, or a run of
    /// padding slots (which see only themselves).
    Runs(Vec<(usize, usize, Tensor)>),
}
