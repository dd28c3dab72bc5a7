//! The seam for expert parallelism. Model code stays single-device: a `MoeBlock` runs its
//! experts stage (dispatch → experts → combine) locally unless an [`ExpertParallel`] is
//! attached, which then moves tokens to the ranks owning their experts, runs the rank's local
//! experts through [`local_experts`], and brings the results back (`lockstep-dist`).
//!
//! Legend: N tokens, D hidden, A assignments, R rows received (expert parallelism), S sources,
//! E experts.

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

/// The experts stage on one device: out_ND = Σ_a weight_a · experts[expert_a](x[token_a]).
/// CUDA tensors take the grouped-GEMM ops, or under the batch-invariant kernels the device
/// plan's gather and combine (f32, ascending route order — the combine expert parallelism uses)
/// around `Experts::forward`'s invariant per-expert products; on the CPU the reference stages
/// (`Dispatch`, `Experts::forward`, `combine`).
pub fn local_experts(x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, experts: &Experts) -> Result<Tensor> {
    if x_ND.device().is_cuda() {
        return if experts.kernels() == Kernels::Invariant {
            gpu_invariant_experts(x_ND, token_A, expert_A, weight_A, experts)
        } else {
            gpu_experts(x_ND, token_A, expert_A, weight_A, experts)
        };
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
    if x_RD.device().is_cuda() && experts.kernels() != Kernels::Invariant {
        return gpu_experts_rows(x_RD, counts_SE, experts);
    }
    let counts = expert_counts(counts_SE, e);
    let mut first = Vec::with_capacity(e);
    let mut acc = 0;
    for &c in &counts {
        first.push(acc);
        acc += c;
    }
    // pos[a]: the expert-major row of arriving row a
    let pos = expert_major_rows(counts_SE, &first);
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

/// Rows of each expert over all sources (`counts_SE[s · E + e]` → [E]).
pub fn expert_counts(counts_SE: &[usize], num_experts: usize) -> Vec<usize> {
    let mut counts = vec![0usize; num_experts];
    for (i, &c) in counts_SE.iter().enumerate() {
        counts[i % num_experts] += c;
    }
    counts
}

/// The one ordering rule of received rows: rows that arrive grouped by source, each source's
/// rows grouped by expert, regrouped expert-major with the sources in order within an expert.
/// Returns, per arriving row, its row there: `first_E[e]` (expert e's first row) + the rows of
/// e from earlier sources + its index within its block. Shared by the CPU path and the CUDA
/// plan (`gpu::plan::Plan::sorted_rows`, whose padded layout gives other `first_E`).
pub fn expert_major_rows(counts_SE: &[usize], first_E: &[usize]) -> Vec<u32> {
    let mut next = first_E.to_vec();
    let mut pos = Vec::with_capacity(counts_SE.iter().sum());
    for block in counts_SE.chunks(first_E.len().max(1)) {
        for (slot, &c) in next.iter_mut().zip(block) {
            pos.extend((*slot..*slot + c).map(|p| p as u32));
            *slot += c;
        }
    }
    pos
}

#[cfg(feature = "cuda")]
fn gpu_experts_rows(x_RD: &Tensor, counts_SE: &[usize], experts: &Experts) -> Result<Tensor> {
    Ok(crate::gpu::experts_rows(x_RD, counts_SE, &experts.gate_up_proj, &experts.down_proj, crate::gpu::GemmImpl::from_env())?)
}

#[cfg(not(feature = "cuda"))]
fn gpu_experts_rows(_: &Tensor, _: &[usize], _: &Experts) -> Result<Tensor> {
    Err(crate::error::ModelError::Candle(candle_core::Error::Msg("the CUDA MoE path needs the `cuda` feature".into())))
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

#[cfg(feature = "cuda")]
fn gpu_invariant_experts(x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, experts: &Experts) -> Result<Tensor> {
    let groups = crate::gpu::RowGroups::new(token_A, expert_A, x_ND.dim(0)?, experts.num_experts())?;
    let y_AD = experts.forward(&groups.gather(x_ND)?, groups.counts())?;
    Ok(groups.combine(&y_AD, weight_A)?.to_dtype(x_ND.dtype())?)
}

#[cfg(not(feature = "cuda"))]
fn gpu_invariant_experts(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Experts) -> Result<Tensor> {
    Err(crate::error::ModelError::Candle(candle_core::Error::Msg("the CUDA MoE path needs the `cuda` feature".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
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
