//! Route stage: router logits → scores → a routing decision ([`LayerRoute`]), for token choice
//! (each token picks k experts) and expert choice (each expert picks tokens), computed, recorded
//! or replayed through the same code, so replaying a recording reproduces it bit for bit.
//!
//! scores_NE = softmax(logits) or sigmoid(logits), logits = x_ND · Wᵀ in f32. The softmax is
//! the fused op of [`fused`] (fixed reduction order, one launch on CUDA, with its backward);
//! the sigmoid is candle's (already one op).
//!
//! Legend: N tokens, D hidden, E experts, K experts per token, A assignments.

pub mod expert_choice;
pub mod fused;
pub mod select;
pub mod token_choice;

use candle_core::{DType, Module, Result as CResult, Tensor};
use candle_nn::VarBuilder;

use crate::batch::Batch;
use crate::config::{RouterConfig, RoutingStrategy, ScoreFunction};
use crate::error::Result;
use crate::nn::linear::{linear_no_bias, Linear};
use crate::routing::{LayerRoute, RouteMode};

#[derive(Debug, Clone)]
pub struct Router {
    /// `mlp.gate.weight`: [E, D]
    pub gate: Linear,
    /// `mlp.gate.e_score_correction_bias`: [E], added to scores for selection only
    pub expert_bias: Option<Tensor>,
    cfg: RouterConfig,
}

impl Router {
    pub fn new(cfg: &RouterConfig, hidden: usize, vb: VarBuilder) -> CResult<Self> {
        let gate = linear_no_bias(hidden, cfg.num_experts, vb.clone())?;
        let expert_bias = if cfg.expert_bias {
            Some(vb.get_with_hints_dtype(cfg.num_experts, "e_score_correction_bias", Default::default(), DType::F32)?)
        } else {
            None
        };
        Ok(Self { gate, expert_bias, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Change the routing strategy (e.g. token choice → expert choice) keeping the weights.
    pub fn set_strategy(&mut self, s: RoutingStrategy) {
        self.cfg.strategy = s;
    }

    /// Raw logits and scores, both [N, E] f32.
    pub fn scores(&self, x_ND: &Tensor) -> CResult<(Tensor, Tensor)> {
        let logits_NE = self.gate.forward(x_ND)?.to_dtype(DType::F32)?;
        let scores_NE = match self.cfg.score_function {
            ScoreFunction::Softmax => fused::softmax(&logits_NE)?,
            ScoreFunction::Sigmoid => candle_nn::ops::sigmoid(&logits_NE)?,
        };
        Ok((logits_NE, scores_NE))
    }

    /// Decide the route of `x_ND` under `mode` (`layer` names errors). Weights are f32.
    pub fn route(&self, x_ND: &Tensor, mode: &RouteMode, layer: usize, batch: &Batch) -> Result<LayerRoute> {
        let (logits_NE, scores_NE) = self.scores(x_ND)?;
        match self.cfg.strategy {
            RoutingStrategy::TokenChoice => token_choice::route(self, logits_NE, scores_NE, mode, layer),
            RoutingStrategy::ExpertChoice { capacity_factor, pool } => {
                expert_choice::route(self, logits_NE, scores_NE, mode, layer, batch, capacity_factor, pool)
            }
        }
    }

    /// The ids this router would pick freely from `scores_NE` (token choice): [N, K] u32.
    pub fn free_top_k(&self, scores_NE: &Tensor) -> Result<Tensor> {
        token_choice::select(self, scores_NE)
    }

    /// The experts every token slot of `batch` would get under free routing from `scores_NE`,
    /// whichever the strategy (token choice: its top-k; expert choice: the experts whose top-C
    /// of the token's pool took it), as host (token, expert) pairs.
    pub fn free_pairs(&self, scores_NE: &Tensor, batch: &Batch) -> Result<Vec<(u32, u32)>> {
        match self.cfg.strategy {
            RoutingStrategy::TokenChoice => {
                let ids: Vec<u32> = self.free_top_k(scores_NE)?.flatten_all()?.to_vec1()?;
                let k = self.cfg.top_k.max(1);
                Ok(ids.iter().enumerate().map(|(a, &e)| ((a / k) as u32, e)).collect())
            }
            RoutingStrategy::ExpertChoice { capacity_factor, pool } => {
                let choice = self.selection_scores(scores_NE)?;
                let e = choice.dims2()?.1;
                let pools = expert_choice::pools(batch, pool);
                let caps = pools.iter().map(|p| expert_choice::capacity(capacity_factor, p.len(), e)).collect();
                let pairs: Vec<u32> = select::ExpertChoice { pools, caps }.apply(&choice)?.flatten_all()?.to_vec1()?;
                let a = pairs.len() / 2;
                Ok(pairs[..a].iter().copied().zip(pairs[a..].iter().copied()).collect())
            }
        }
    }

    /// The scores selection ranks: `scores_NE` plus the expert bias, if any (the bias only
    /// steers selection; weights use the unbiased scores).
    fn selection_scores(&self, scores_NE: &Tensor) -> CResult<Tensor> {
        match &self.expert_bias {
            Some(b) => scores_NE.broadcast_add(&b.to_dtype(DType::F32)?.unsqueeze(0)?),
            None => Ok(scores_NE.clone()),
        }
    }

    /// Multiply by `routed_scaling_factor` unless it is 1.
    fn scale(&self, w: Tensor) -> CResult<Tensor> {
        if self.cfg.routed_scaling_factor == 1.0 {
            Ok(w)
        } else {
            w * self.cfg.routed_scaling_factor
        }
    }
}
