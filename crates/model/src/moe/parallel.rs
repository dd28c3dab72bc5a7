//! The seam for expert parallelism. Model code stays single-device: a `MoeBlock` runs its
//! experts stage (dispatch → experts → combine) locally unless an [`ExpertParallel`] is
//! attached, which then moves tokens to the ranks owning their experts, runs the rank's local
//! experts through [`local_experts`], and brings the results back (`lockstep-dist`).
//!
//! Legend: N tokens, D hidden, A assignments.

use candle_core::Tensor;

use super::combine;
use super::dispatch::Dispatch;
use super::experts::Experts;
use crate::error::Result;
use crate::nn::Kernels;

/// A replacement for the local experts stage of every MoE layer.
pub trait ExpertParallel: Send + Sync + std::fmt::Debug {
    /// x_ND and the layer's assignments (`token_A`, global `expert_A`, `weight_A`) → out_ND
    /// = Σ_a weight_a · expert_a(x_token_a), with `local` holding this rank's experts.
    fn experts_stage(&self, layer: usize, x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, local: &Experts)
        -> Result<Tensor>;
}

/// The experts stage on one device: out_ND = Σ_a weight_a · experts[expert_a](x[token_a]),
/// through the CUDA grouped-GEMM ops for CUDA tensors (except under the CPU-only invariant
/// kernels), else the reference stages (`Dispatch`, `Experts::forward`, `combine`).
pub fn local_experts(x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, experts: &Experts) -> Result<Tensor> {
    if x_ND.device().is_cuda() && experts.kernels() != Kernels::Invariant {
        return gpu_experts(x_ND, token_A, expert_A, weight_A, experts);
    }
    let n = x_ND.dim(0)?;
    let (tok, exp): (Vec<u32>, Vec<u32>) = (token_A.to_vec1()?, expert_A.to_vec1()?);
    // dispatch
    let dispatch = Dispatch::from_pairs(&tok, &exp, weight_A, experts.num_experts(), x_ND.device())?;
    let x_AD = dispatch.gather(x_ND)?;
    // experts
    let y_AD = experts.forward(&x_AD, &dispatch.counts)?;
    // combine
    Ok(combine::combine(&y_AD, &dispatch, n)?)
}

#[cfg(feature = "cuda")]
fn gpu_experts(x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, experts: &Experts) -> Result<Tensor> {
    Ok(crate::gpu::experts_forward(
        x_ND,
        token_A,
        expert_A,
        weight_A,
        &experts.gate_up_proj,
        &experts.down_proj,
        crate::gpu::GemmImpl::from_env(),
    )?)
}

#[cfg(not(feature = "cuda"))]
fn gpu_experts(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Experts) -> Result<Tensor> {
    Err(crate::error::ModelError::Candle(candle_core::Error::Msg("the CUDA MoE path needs the `cuda` feature".into())))
}
