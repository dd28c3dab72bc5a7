//! The dispatch plan of one MoE layer — one type, in a host and a device form: where every
//! assignment's token row goes when the rows are grouped (by expert, or by owner rank for
//! expert parallelism), and how the weighted rows come back to their tokens.
//!
//! - `Host`: the stable counting sort of `moe::dispatch` (one host copy of the route);
//!   combine = the weights in grouped order × rows, added per token (`index_add`);
//! - `Device` (CUDA): the device plan of `gpu::RowGroups` (histogram, stable per-group rank and
//!   a token CSR built on the GPU; nothing comes back unless the group sizes are asked for —
//!   the invariant grouped products take them on the device); combine sums each token's rows in
//!   f32 in ascending route order.
//!
//! The form follows the experts' backend ([`ExpertsBackend`]), chosen once; the grouped-GEMM
//! backend builds the same device plan inside its fused op.
//!
//! Legend: N tokens, D hidden, A assignments, G groups.

use candle_core::{Result, Tensor};

use super::dispatch::sort_by_expert;
use super::experts::{Experts, ExpertsBackend};

#[derive(Debug, Clone)]
pub enum DispatchPlan {
    Host {
        /// [A] u32: the route's assignment at each grouped row
        order_A: Tensor,
        /// [A] u32: the token of each grouped row
        token_A: Tensor,
        /// rows of each group
        counts: Vec<usize>,
        num_tokens: usize,
    },
    #[cfg(feature = "cuda")]
    Device(crate::gpu::RowGroups),
}

impl DispatchPlan {
    /// Group the assignments (`token_A`, `group_A` [A] u32 < `groups`) of a batch of
    /// `num_tokens`, in the form `backend` runs.
    pub fn build(token_A: &Tensor, group_A: &Tensor, num_tokens: usize, groups: usize, backend: ExpertsBackend) -> Result<Self> {
        match backend {
            ExpertsBackend::Reference => {
                let (tok, grp): (Vec<u32>, Vec<u32>) = (token_A.to_vec1()?, group_A.to_vec1()?);
                if let Some(&g) = grp.iter().find(|&&g| g as usize >= groups) {
                    candle_core::bail!("dispatch plan: group {g} >= {groups} groups");
                }
                let (order, counts) = sort_by_expert(&grp, groups);
                let token: Vec<u32> = order.iter().map(|&a| tok[a as usize]).collect();
                let (a, dev) = (order.len(), token_A.device());
                Ok(Self::Host { order_A: Tensor::from_vec(order, a, dev)?, token_A: Tensor::from_vec(token, a, dev)?, counts, num_tokens })
            }
            #[cfg(feature = "cuda")]
            ExpertsBackend::Grouped(_) | ExpertsBackend::DeviceInvariant => Ok(Self::Device(crate::gpu::RowGroups::new(token_A, group_A, num_tokens, groups)?)),
        }
    }

    /// rows of each group (the device form copies them back on first use)
    pub fn counts(&self) -> Result<&[usize]> {
        match self {
            Self::Host { counts, .. } => Ok(counts),
            #[cfg(feature = "cuda")]
            Self::Device(g) => g.counts(),
        }
    }

    /// The experts on x_AD grouped by this plan (its gather) → y_AD: under the batch-invariant
    /// kernels with a device plan the grouped products take the counts on the device (no copy
    /// back: a decode step's layers never wait for the host); else `Experts::forward` with the
    /// plan's counts.
    pub fn experts_forward(&self, experts: &Experts, x_AD: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (crate::nn::Kernels::Invariant, Self::Device(g)) = (experts.kernels(), self) {
            let h = g.grouped_matmul_nt(x_AD, &experts.gate_up_proj)?;
            return g.grouped_matmul_nt(&crate::nn::swiglu::swiglu(&h)?, &experts.down_proj);
        }
        experts.forward(x_AD, self.counts()?)
    }

    /// x_ND → the grouped rows x_AD.
    pub fn gather(&self, x_ND: &Tensor) -> Result<Tensor> {
        match self {
            Self::Host { token_A, .. } => x_ND.index_select(token_A, 0),
            #[cfg(feature = "cuda")]
            Self::Device(g) => g.gather(x_ND),
        }
    }

    /// (y_AD grouped, weight_A in the route's order) → out_ND = Σ_a weight_a · y[row of a]
    /// (zero for tokens with no assignment), in y's dtype.
    pub fn combine(&self, y_AD: &Tensor, weight_A: &Tensor) -> Result<Tensor> {
        match self {
            Self::Host { order_A, token_A, num_tokens, .. } => {
                let w_A1 = weight_A.index_select(order_A, 0)?.to_dtype(y_AD.dtype())?.unsqueeze(1)?;
                let d = y_AD.dim(1)?;
                Tensor::zeros((*num_tokens, d), y_AD.dtype(), y_AD.device())?.index_add(token_A, &y_AD.broadcast_mul(&w_A1)?, 0)
            }
            #[cfg(feature = "cuda")]
            Self::Device(g) => g.combine(y_AD, weight_A)?.to_dtype(y_AD.dtype()),
        }
    }
}
