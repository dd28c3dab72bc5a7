//! A synthetic MoE experts layer for benchmarks and kernel checks (`lockstep bench-moe`):
//! random inputs and expert weights drawn with the device's RNG (`Device::set_seed`), routed
//! once by a softmax top-k [`Router`] (renormalised), and the gradients of `out.backward(g)` for
//! a fixed cotangent g. [`SyntheticLayer::reference`] runs the reference stages
//! ([`super::reference_experts`]) in f32 on the same device: what the fused CUDA ops are
//! checked against.
//!
//! Legend: N tokens, D hidden, F expert intermediate, E experts, K experts per token,
//! A = N · K assignments.

use std::collections::HashMap;
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use candle_nn::VarBuilder;

use super::experts::Experts;
use super::router::Router;
use crate::batch::Batch;
use crate::config::RouterConfig;
use crate::error::{ModelError, ParseError, Result};
use crate::routing::RouteMode;

/// The shape of one layer: tokens T (= N), hidden H (= D), expert width F, E experts, top-K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub name: &'static str,
    pub t: usize,
    pub h: usize,
    pub f: usize,
    pub e: usize,
    pub k: usize,
}

impl LayerShape {
    /// T 4096, H 1024, F 768, E 64, K 8.
    pub const A: Self = Self { name: "a", t: 4096, h: 1024, f: 768, e: 64, k: 8 };
    /// Qwen3-30B-A3B's MoE layer on 8192 tokens: T 8192, H 2048, F 768, E 128, K 8.
    pub const B: Self = Self { name: "b", t: 8192, h: 2048, f: 768, e: 128, k: 8 };
    /// T 256, H 64, F 32, E 8, K 2.
    pub const SMALL: Self = Self { name: "small", t: 256, h: 64, f: 32, e: 8, k: 2 };
}

/// `a`, `b` or `small`.
impl FromStr for LayerShape {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "a" => Ok(Self::A),
            "b" => Ok(Self::B),
            "small" => Ok(Self::SMALL),
            other => Err(ParseError::new(other, "a, b or small")),
        }
    }
}

/// Inputs, weights and a route of one layer. Gradients are taken with respect to the `Var`s.
pub struct SyntheticLayer {
    /// [N, D] input rows
    pub x: Var,
    /// [E, 2F, D] gate (first F rows) and up projections
    pub gate_up: Var,
    /// [E, D, F]
    pub down: Var,
    /// [A] f32 routing weights
    pub w_A: Var,
    /// [A] u32 token of each assignment (token-major: `a / K`)
    pub token_A: Tensor,
    /// [A] u32 expert of each assignment (selection order within a token)
    pub expert_A: Tensor,
    /// [N, D] the cotangent of the output
    pub g: Tensor,
}

impl SyntheticLayer {
    /// `t` tokens of shape `s` (its T ignored) in `dtype` (x, the expert weights, g; the
    /// routing weights stay f32). Draws, in order: x, the router [E, D] (std 1/√D), gate_up and
    /// down (std 0.02), g; all normal, f32, then cast.
    pub fn new(s: LayerShape, t: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let x = Tensor::randn(0f32, 1f32, (t, s.h), dev)?;
        let router_ED = (Tensor::randn(0f32, 1f32, (s.e, s.h), dev)? * (1.0 / (s.h as f64).sqrt()))?;
        let router = Router::new(
            &RouterConfig::softmax_top_k(s.e, s.k, true),
            s.h,
            VarBuilder::from_tensors(HashMap::from([("weight".to_string(), router_ED)]), DType::F32, dev),
        )?;
        let batch = Batch::padded(&[vec![0u32; t]], &[vec![1u8; t]], dev)?;
        let route = router.route(&x, &RouteMode::Record, 0, &batch)?;
        let std = 0.02;
        Ok(Self {
            x: Var::from_tensor(&x.to_dtype(dtype)?)?,
            gate_up: Var::from_tensor(&(Tensor::randn(0f32, 1f32, (s.e, 2 * s.f, s.h), dev)? * std)?.to_dtype(dtype)?)?,
            down: Var::from_tensor(&(Tensor::randn(0f32, 1f32, (s.e, s.h, s.f), dev)? * std)?.to_dtype(dtype)?)?,
            w_A: Var::from_tensor(&route.weight_A)?,
            token_A: route.token_A,
            expert_A: route.expert_A,
            g: Tensor::randn(0f32, 1f32, (t, s.h), dev)?.to_dtype(dtype)?,
        })
    }

    /// The gradients of `out.backward(g)` (like PyTorch's `y.backward(g)`: no loss reduction),
    /// `out` computed from this layer's vars: [dx, dgate_up, ddown, dw].
    pub fn grads(&self, out: &Tensor) -> Result<Vec<Tensor>> {
        let grads = out.apply_op1(Seed(self.g.clone()))?.backward()?;
        self.of(&grads, [&self.x, &self.gate_up, &self.down, &self.w_A])
    }

    /// The reference stages in f32 on copies of the layer's vars (`moe::reference_experts`,
    /// loss Σ out · g): (out, [dx, dgate_up, ddown, dw]).
    pub fn reference(&self) -> Result<(Tensor, Vec<Tensor>)> {
        let f32v = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?) };
        let (x, gu, dn, w) = (f32v(&self.x)?, f32v(&self.gate_up)?, f32v(&self.down)?, f32v(&self.w_A)?);
        let experts = Experts::from_stacked(gu.as_tensor().clone(), dn.as_tensor().clone())?;
        let out = super::reference_experts(x.as_tensor(), &self.token_A, &self.expert_A, w.as_tensor(), &experts)?;
        let loss = out.mul(&self.g.to_dtype(DType::F32)?)?.sum_all()?;
        let grads = loss.backward()?;
        let gs = self.of(&grads, [&x, &gu, &dn, &w])?;
        Ok((out, gs))
    }

    fn of(&self, grads: &GradStore, vars: [&Var; 4]) -> Result<Vec<Tensor>> {
        let names = ["x", "gate_up", "down", "w"];
        vars.iter()
            .zip(names)
            .map(|(v, name)| {
                grads.get(v.as_tensor()).cloned().ok_or_else(|| ModelError::Candle(candle_core::Error::Msg(format!("no gradient for {name}"))))
            })
            .collect()
    }
}

/// Identity whose backward hands `g` to its input: `root.backward()` then gives out the
/// gradient g (candle seeds a non-scalar root with ones).
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "bench-seed"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}
