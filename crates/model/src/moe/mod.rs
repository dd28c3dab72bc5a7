//! The sparse MoE block as named stages: route → dispatch → experts → combine (+ shared expert).
//!
//! Legend: N tokens, D hidden, E experts, K experts per token, A assignments.

pub mod dispatch;
pub mod experts;
pub mod parallel;
pub mod plan;
pub mod router;
pub mod synthetic;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::batch::Batch;
use crate::config::MoeBlockConfig;
use crate::error::Result;
use crate::nn::linear::{linear_no_bias, Linear};
use crate::nn::mlp::SwiGlu;
use crate::nn::Kernels;
use crate::routing::{LayerRoute, RouteMode};
use experts::Experts;
use parallel::ExpertParallel;
use router::Router;

/// A shared expert every token passes through: Qwen2-MoE's `sigmoid(shared_expert_gate(x)) ·
/// SwiGLU(x)`, or GLM-4.5's ungated `shared_experts`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: SwiGlu,
    pub gate: Option<Linear>,
}

#[derive(Debug, Clone)]
pub struct MoeBlock {
    pub router: Router,
    pub experts: Experts,
    pub shared: Option<SharedExpert>,
    /// Set when the experts are sharded across ranks (`lockstep-dist`): `experts` then holds
    /// this rank's experts only and this carries tokens to and from their owners.
    pub expert_parallel: Option<std::sync::Arc<dyn ExpertParallel>>,
}

impl MoeBlock {
    pub fn new(cfg: &MoeBlockConfig, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let router = Router::new(&cfg.router, hidden, vb.pp("gate"))?;
        let experts = Experts::new(cfg.router.num_experts, hidden, cfg.expert_intermediate_size, vb.pp("experts"))?;
        let shared = match &cfg.shared_expert {
            None => None,
            Some(s) => Some(SharedExpert {
                mlp: SwiGlu::new(hidden, s.intermediate_size, vb.pp(&s.name))?,
                gate: if s.gated { Some(linear_no_bias(hidden, 1, vb.pp("shared_expert_gate"))?) } else { None },
            }),
        };
        Ok(Self { router, experts, shared, expert_parallel: None })
    }

    pub fn set_kernels(&mut self, k: Kernels) {
        self.router.gate.set_kernels(k);
        self.experts.set_kernels(k);
        if let Some(s) = &mut self.shared {
            s.mlp.set_kernels(k);
            if let Some(g) = &mut s.gate {
                g.set_kernels(k);
            }
        }
    }

    /// x_ND → (out_ND, the route taken).
    pub fn forward(&self, x_ND: &Tensor, mode: &RouteMode, layer: usize, batch: &Batch) -> Result<(Tensor, LayerRoute)> {
        // route
        let route = self.router.route(x_ND, mode, layer, batch)?;
        // dispatch → experts → combine, here or across the expert-parallel ranks
        let mut out_ND = match &self.expert_parallel {
            None => parallel::local_experts(x_ND, &route.token_A, &route.expert_A, &route.weight_A, &self.experts)?,
            Some(ep) => ep.experts_stage(layer, x_ND, &route.token_A, &route.expert_A, &route.weight_A, &self.experts)?,
        };
        if let Some(shared) = &self.shared {
            let mut s = shared.mlp.forward(x_ND)?;
            if let Some(gate) = &shared.gate {
                let g = candle_nn::ops::sigmoid(&gate.forward(x_ND)?)?;
                s = s.broadcast_mul(&g)?;
            }
            out_ND = (out_ND + s)?;
        }
        Ok((out_ND, route))
    }
}

/// The experts stage as the reference stages on any device: dispatch (the host form of
/// [`plan::DispatchPlan`]: assignments grouped by expert, one host copy of the route) →
/// `Experts::forward` → combine, with candle autograd. out_ND = Σ_a weight_a ·
/// experts[expert_a](x[token_a]); the host backend of [`parallel::local_experts`], and what the
/// CUDA ops are checked against.
pub fn reference_experts(x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, experts: &Experts) -> Result<Tensor> {
    // dispatch
    let plan = plan::DispatchPlan::build(token_A, expert_A, x_ND.dim(0)?, experts.num_experts(), experts::ExpertsBackend::Reference)?;
    let x_AD = plan.gather(x_ND)?;
    // experts
    let y_AD = experts.forward(&x_AD, plan.counts()?)?;
    // combine
    Ok(plan.combine(&y_AD, weight_A)?)
}
