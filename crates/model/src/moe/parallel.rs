//! The seam for expert parallelism. Model code stays single-device: a `MoeBlock` runs its
//! experts stage (dispatch → experts → combine) locally unless an [`ExpertParallel`] is
//! attached, which then moves tokens to the ranks owning their experts, runs the rank's local
//! experts through [`local_experts_rows`], and brings the results back. It is the model's stage
//! interface, not a collective: `lockstep_dist::ep::ExpertParallelism` implements it over the
//! one multi-rank trait, `lockstep_collective::Collective`, whose errors reach the model as
//! `ModelError::Collective`.
//!
//! Legend: N tokens, D hidden, A assignments, R rows received (expert parallelism), S sources,
//! E experts.

use candle_core::Tensor;

pub use super::dispatch::{expert_counts, expert_major_rows};
use super::dispatch::starts;
use super::experts::{Experts, ExpertsBackend};
use crate::error::Result;

/// A replacement for the local experts stage of every MoE layer.
pub trait ExpertParallel: Send + Sync + std::fmt::Debug {
    /// x_ND and the layer's assignments (`token_A`, global `expert_A`, `weight_A`) → out_ND
    /// = Σ_a weight_a · expert_a(x_token_a), with `local` holding this rank's experts.
    fn experts_stage(&self, layer: usize, x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, local: &Experts)
        -> Result<Tensor>;
}

/// The experts stage on one device: out_ND = Σ_a weight_a · experts[expert_a](x[token_a]), on
/// the experts' backend (chosen when they were built or their kernels set): the reference
/// stages on the host (`super::reference_experts`: dispatch, `Experts::forward`, combine); on
/// CUDA the grouped-GEMM ops, or under the batch-invariant kernels the device plan's gather and
/// combine (f32, ascending route order — the combine expert parallelism uses) around
/// `Experts::forward`'s invariant per-expert products.
pub fn local_experts(x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, experts: &Experts) -> Result<Tensor> {
    match experts.backend() {
        ExpertsBackend::Reference => super::reference_experts(x_ND, token_A, expert_A, weight_A, experts),
        #[cfg(feature = "cuda")]
        ExpertsBackend::Grouped(imp) => {
            Ok(crate::gpu::experts_forward(x_ND, token_A, expert_A, weight_A, &experts.gate_up_proj, &experts.down_proj, imp)?)
        }
        #[cfg(feature = "cuda")]
        ExpertsBackend::DeviceInvariant => {
            let plan = super::plan::DispatchPlan::build(token_A, expert_A, x_ND.dim(0)?, experts.num_experts(), experts.backend())?;
            let y_AD = plan.experts_forward(experts, &plan.gather(x_ND)?)?;
            Ok(plan.combine(&y_AD, weight_A)?.to_dtype(x_ND.dtype())?)
        }
    }
}

/// The experts stage on rows that arrive grouped by source, each source's rows grouped by
/// expert (expert parallelism, after the dispatch all-to-all; `counts_SE[s · E + e]` rows of
/// expert `e` from source `s`): every row's expert output, unweighted, in arrival order. The
/// experts see each expert's rows sources in order — with the ranks as sources, the order one
/// device sees for the whole batch.
pub fn local_experts_rows(x_RD: &Tensor, counts_SE: &[usize], experts: &Experts) -> Result<Tensor> {
    let e = experts.num_experts();
    if e == 0 || counts_SE.len() % e != 0 || counts_SE.iter().sum::<usize>() != x_RD.dim(0)? {
        return Err(crate::error::ModelError::Candle(candle_core::Error::Msg(format!(
            "local experts: {} rows do not match the row counts {counts_SE:?} of {e} experts",
            x_RD.dim(0)?
        ))));
    }
    #[cfg(feature = "cuda")]
    if let ExpertsBackend::Grouped(imp) = experts.backend() {
        return Ok(crate::gpu::experts_rows(x_RD, counts_SE, &experts.gate_up_proj, &experts.down_proj, imp)?);
    }
    let counts = expert_counts(counts_SE, e);
    // pos[a]: the expert-major row of arriving row a
    let pos = expert_major_rows(counts_SE, &starts(&counts));
    if pos.iter().enumerate().all(|(a, &p)| p as usize == a) {
        return Ok(experts.forward(x_RD, &counts)?);
    }
    let mut order = vec![0u32; pos.len()];
    for (a, &p) in pos.iter().enumerate() {
        order[p as usize] = a as u32;
    }
    let dev = x_RD.device();
    let n = pos.len();
    let y_sorted = experts.forward(&x_RD.index_select(&Tensor::from_vec(order, n, dev)?, 0)?, &counts)?;
    Ok(y_sorted.index_select(&Tensor::from_vec(pos, n, dev)?, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Kernels;
    use candle_core::{DType, Device};

    /// Rows from three sources, each grouped by expert, equal the same rows as single-device
    /// assignments (token = row, weight 1), bitwise, under both CPU kernels; and a count list
    /// that does not match the rows is an error.
    #[test]
    fn rows_from_sources_equal_local_experts() {
        let dev = Device::Cpu;
        let (e, d, f, sources) = (4usize, 8usize, 6usize, 3usize);
        let gu = Tensor::randn(0f32, 0.3, (e, 2 * f, d), &dev).unwrap();
        let dn = Tensor::randn(0f32, 0.3, (e, d, f), &dev).unwrap();
        let counts_SE: Vec<usize> = (0..sources * e).map(|i| (i * 5 + 1) % 4).collect();
        let expert: Vec<u32> = counts_SE.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n((i % e) as u32, c)).collect();
        let r = expert.len();
        let x = Tensor::randn(0f32, 1.0, (r, d), &dev).unwrap();
        let token = Tensor::arange(0u32, r as u32, &dev).unwrap();
        let expert = Tensor::from_vec(expert, r, &dev).unwrap();
        let ones = Tensor::ones(r, DType::F32, &dev).unwrap();
        for kernels in [Kernels::Autograd, Kernels::Invariant] {
            let mut experts = Experts::from_stacked(gu.clone(), dn.clone()).unwrap();
            experts.set_kernels(kernels);
            let got = local_experts_rows(&x, &counts_SE, &experts).unwrap();
            let want = local_experts(&x, &token, &expert, &ones, &experts).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{kernels:?}");
        }
        let experts = Experts::from_stacked(gu, dn).unwrap();
        let err = local_experts_rows(&x, &counts_SE[1..], &experts).unwrap_err().to_string();
        assert!(err.contains("row counts"), "{err}");
    }
}
