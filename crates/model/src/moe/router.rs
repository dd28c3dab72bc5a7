//! Route stage: token-choice softmax top-k router (Qwen3-MoE / Qwen2-MoE), and the replay of a
//! recorded route through the same code.
//!
//! scores_NE = softmax(x_ND · Wᵀ) in f32; ids_NK = top-k of scores (descending);
//! probs_NK = scores gathered at ids; weights_NK = probs / Σ_k probs iff `norm_topk_prob`.
//! Compute and replay share `weights_at`, so replaying a recording reproduces it bit for bit.
//!
//! Legend: N tokens, D hidden, E experts, K experts per token.

use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use crate::config::RouterConfig;
use crate::error::{ModelError, Result};
use crate::routing::{LayerRoute, Replay, ReplayWeights, RouteMode, ROUTE_FREE};

#[derive(Debug, Clone)]
pub struct TopKRouter {
    /// `mlp.gate`: [E, D]
    pub gate: Linear,
    cfg: RouterConfig,
}

impl TopKRouter {
    pub fn new(cfg: &RouterConfig, hidden: usize, vb: VarBuilder) -> CResult<Self> {
        Ok(Self { gate: linear_no_bias(hidden, cfg.num_experts, vb)?, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Router logits and the full router distribution, both [N, E] f32.
    fn scores(&self, x_ND: &Tensor) -> CResult<(Tensor, Tensor)> {
        let logits_NE = self.gate.forward(x_ND)?.to_dtype(DType::F32)?;
        let scores_NE = candle_nn::ops::softmax(&logits_NE, D::Minus1)?;
        Ok((logits_NE, scores_NE))
    }

    /// Top-k expert ids [N, K] u32, descending probability.
    fn select(&self, scores_NE: &Tensor) -> CResult<Tensor> {
        scores_NE.arg_sort_last_dim(false)?.narrow(1, 0, self.cfg.top_k)?.contiguous()
    }

    /// Router probabilities at `ids` and the weights they imply.
    fn weights_at(&self, scores_NE: &Tensor, ids_NK: &Tensor) -> CResult<(Tensor, Tensor)> {
        let probs_NK = scores_NE.gather(ids_NK, 1)?;
        let weights_NK = if self.cfg.norm_topk_prob {
            probs_NK.broadcast_div(&probs_NK.sum_keepdim(1)?)?
        } else {
            probs_NK.clone()
        };
        Ok((probs_NK, weights_NK))
    }

    /// Decide the route of `x_ND` under `mode` (`layer` names errors). Weights come back in f32.
    pub fn route(&self, x_ND: &Tensor, mode: &RouteMode, layer: usize) -> Result<LayerRoute> {
        let (logits_NE, scores_NE) = self.scores(x_ND)?;
        let (ids_NK, probs_NK, weights_NK) = match mode {
            RouteMode::Compute | RouteMode::Record => {
                let ids = self.select(&scores_NE)?;
                let (p, w) = self.weights_at(&scores_NE, &ids)?;
                (ids, p, w)
            }
            RouteMode::Replay(replay) => self.replay(&scores_NE, replay, layer)?,
        };
        Ok(LayerRoute { ids_NK, probs_NK, weights_NK, scores_NE, logits_NE })
    }

    fn replay(&self, scores_NE: &Tensor, replay: &Replay, layer: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, k) = (scores_NE.dim(0)?, self.cfg.top_k);
        let forced = replay.ids_NK.to_dtype(DType::U32)?;
        let forced_host: Vec<u32> = forced.flatten_all()?.to_vec1()?;
        if forced_host.len() != n * k {
            return Err(ModelError::routing(layer, format!("replay ids hold {} entries for {n} tokens x {k}", forced_host.len())));
        }
        let free_rows: Vec<bool> = forced_host.chunks(k).map(|r| r[0] == ROUTE_FREE).collect();
        let any_free = free_rows.iter().any(|&f| f);
        let dev = scores_NE.device();
        let ids_NK = if any_free {
            // Free rows take the router's own choice; forced rows keep theirs.
            let own: Vec<u32> = self.select(scores_NE)?.flatten_all()?.to_vec1()?;
            let merged: Vec<u32> = forced_host
                .chunks(k)
                .zip(own.chunks(k))
                .flat_map(|(f, o)| if f[0] == ROUTE_FREE { o.to_vec() } else { f.to_vec() })
                .collect();
            Tensor::from_vec(merged, (n, k), dev)?
        } else {
            forced.reshape((n, k))?
        };
        let (probs_NK, live_NK) = self.weights_at(scores_NE, &ids_NK)?;
        let weights_NK = match &replay.weights {
            ReplayWeights::Recompute => live_NK,
            ReplayWeights::Given(w) => {
                // supplied weights are data, not part of this graph
                let w = w.detach().to_dtype(DType::F32)?;
                if any_free {
                    let mask = free_mask(&free_rows, k, dev)?;
                    mask.where_cond(&live_NK, &w)?
                } else {
                    w
                }
            }
        };
        Ok((ids_NK, probs_NK, weights_NK))
    }
}

/// [N, K] u8 mask, 1 on the rows that route freely.
fn free_mask(free_rows: &[bool], k: usize, dev: &Device) -> CResult<Tensor> {
    let v: Vec<u8> = free_rows.iter().flat_map(|&f| std::iter::repeat_n(u8::from(f), k)).collect();
    Tensor::from_vec(v, (free_rows.len(), k), dev)
}
