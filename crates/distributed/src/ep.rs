//! Expert parallelism: experts sharded over the ranks (rank r owns experts r·L .. (r+1)·L,
//! L = E / world), tokens moved to their experts' owners and back, as the named stages
//!
//! ```text
//! route (local, replicated router) → dispatch: group assignments by expert (so by owner
//!   rank, each owner's block by local expert), all-to-all (rows per expert first, then the
//!   rows) → experts: this rank's grouped experts on the received rows
//!   (`local_experts_rows`: expert-major, sources in order) → combine: reverse all-to-all,
//!   weight, sum per token
//! ```
//!
//! The backward runs the same exchanges in reverse (`AllToAll`'s backward is the all-to-all
//! with the counts swapped), so gradients reach x, the local experts and the router's weights.
//! It is the same for token choice (K assignments per token) and expert choice (any
//! assignments): the exchange moves assignments, whoever chose them. Expert choice pools stay
//! local to the rank (each rank routes its own micro-batch; pools `block:*` and `sequence`
//! equal the single-GPU result as long as sequences are not split across ranks, `batch` means
//! the rank's micro-batch). A replayed route sends every token to the same experts, hence the
//! same ranks.
//!
//! Legend: N tokens, D hidden, E experts, L experts per rank, A assignments (this rank's
//! tokens), R rows received (assignments to this rank's experts), W ranks.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result as CResult, Shape, Storage, Tensor};
use lockstep_model::moe::experts::{Experts, ExpertsBackend};
use lockstep_model::moe::plan::DispatchPlan;
use lockstep_model::moe::parallel::{local_experts_rows, ExpertParallel};
use lockstep_collective::{Collective, Result as CollectiveResult};
use lockstep_model::{ModelError, Result};

/// The experts stage of every MoE layer across the ranks of `comm`.
#[derive(Debug, Clone)]
pub struct ExpertParallelism {
    pub comm: Arc<dyn Collective>,
    /// experts of the whole model layer
    pub num_experts: usize,
}

impl ExpertParallelism {
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.comm.world_size()
    }
}

fn err(layer: usize, msg: String) -> ModelError {
    ModelError::routing(layer, format!("expert parallelism: {msg}"))
}

/// The dispatch stage's result: this rank's share of the assignments of every rank, and what
/// the combine stage needs to bring the results home.
#[derive(Debug, Clone)]
pub struct Dispatched {
    /// rows received, one per assignment to this rank's experts: grouped by source rank, each
    /// source's rows grouped by local expert (stable within an expert)
    pub x_RD: Tensor,
    /// `recv_counts[s · L + j]`: rows from rank s for local expert j
    pub recv_counts: Vec<usize>,
    pub send_rows: Vec<usize>,
    pub recv_rows: Vec<usize>,
    /// the model's dispatch plan of the sent assignments (grouped by expert, hence by owner):
    /// its combine brings the results home in the route's order
    plan: DispatchPlan,
}

fn block_sums(counts: &[usize], block: usize) -> Vec<usize> {
    counts.chunks(block).map(|c| c.iter().sum()).collect()
}

impl ExpertParallelism {
    /// dispatch: group the assignments by expert (stable) — hence by owner rank, each owner's
    /// block by its local expert — in the form of `backend` (the local experts' backend: the
    /// host plan or the device plan), exchange the rows per expert, then the rows.
    pub fn dispatch(&self, layer: usize, x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, backend: ExpertsBackend) -> Result<Dispatched> {
        let l = self.experts_per_rank();
        let plan = DispatchPlan::build(token_A, expert_A, x_ND.dim(0)?, self.num_experts, backend).map_err(|e| err(layer, e.to_string()))?;
        let counts_E = plan.counts().map_err(|e| err(layer, e.to_string()))?.to_vec();
        let x_AD = plan.gather(x_ND)?;
        let send_rows = block_sums(&counts_E, l);
        let recv_counts = self.comm.exchange_counts(&counts_E)?;
        let recv_rows = block_sums(&recv_counts, l);
        let x_RD = AllToAll::apply(&self.comm, &x_AD, &send_rows, &recv_rows)?;
        Ok(Dispatched { x_RD, recv_counts, send_rows, recv_rows, plan })
    }

    /// experts: every received row through this rank's experts, weight 1 (the weights are
    /// applied at home, in `combine`); each local expert sees its rows source rank by source
    /// rank, the order one device holding the whole batch gives them.
    pub fn experts(&self, dispatched: &Dispatched, local: &Experts) -> Result<Tensor> {
        let x_RD = &dispatched.x_RD;
        if x_RD.dim(0)? == 0 {
            // keeps x_RD in the graph, so this rank joins the backward exchange like the others
            return Ok((x_RD * 0.0)?);
        }
        local_experts_rows(x_RD, &dispatched.recv_counts, local)
    }

    /// combine: the results back to their tokens' ranks, weighted, summed per token (on the
    /// GPU in ascending route order and f32, like the single-device combine).
    pub fn combine(&self, dispatched: &Dispatched, y_RD: &Tensor, weight_A: &Tensor) -> Result<Tensor> {
        let Dispatched { send_rows, recv_rows, plan, .. } = dispatched;
        let y_AD = AllToAll::apply(&self.comm, y_RD, recv_rows, send_rows)?;
        Ok(plan.combine(&y_AD, weight_A)?)
    }
}

impl ExpertParallel for ExpertParallelism {
    fn experts_stage(&self, layer: usize, x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor, weight_A: &Tensor, local: &Experts)
        -> Result<Tensor> {
        let w = self.comm.world_size();
        let l = self.experts_per_rank();
        if local.num_experts() != l {
            return Err(err(layer, format!("this rank holds {} experts, expected {l} ({} over {w} ranks)", local.num_experts(), self.num_experts)));
        }
        let dispatched = self.dispatch(layer, x_ND, token_A, expert_A, local.backend())?;
        let y_RD = self.experts(&dispatched, local)?;
        self.combine(&dispatched, &y_RD, weight_A)
    }
}

/// A differentiable row all-to-all: forward sends `send_rows` / receives `recv_rows`, the
/// backward sends the gradient back the same way reversed. A collective that exchanges CUDA
/// storages directly (NCCL) does it inside the op into fresh memory; otherwise the exchange
/// runs at the tensor level first (`Collective::all_to_all_rows`) and the op hands the result
/// to candle's graph.
struct AllToAll {
    comm: Arc<dyn Collective>,
    send_rows: Vec<usize>,
    recv_rows: Vec<usize>,
    /// the tensor-level result, when the exchange is not done inside the op
    result: Option<Tensor>,
}

impl AllToAll {
    fn new(comm: &Arc<dyn Collective>, x: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> CollectiveResult<Self> {
        let direct = x.device().is_cuda() && comm.exchanges_cuda_storage();
        let result = if direct { None } else { Some(comm.all_to_all_rows(x, send_rows, recv_rows)?.contiguous()?) };
        Ok(AllToAll { comm: comm.clone(), send_rows: send_rows.to_vec(), recv_rows: recv_rows.to_vec(), result })
    }

    fn apply(comm: &Arc<dyn Collective>, x: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> CollectiveResult<Tensor> {
        let op = Self::new(comm, x, send_rows, recv_rows)?;
        Ok(x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))?)
    }

    /// The precomputed result's storage (contiguous, from offset 0).
    fn owned(&self) -> CResult<(Storage, Shape)> {
        let Some(result) = &self.result else { candle_core::bail!("all-to-all: no result computed") };
        let (st, l) = result.storage_and_layout();
        match (l.contiguous_offsets(), &*st) {
            (Some((0, _)), Storage::Cpu(c)) => Ok((Storage::Cpu(c.clone()), l.shape().clone())),
            #[cfg(feature = "cuda")]
            (Some((0, _)), Storage::Cuda(c)) => Ok((Storage::Cuda(c.try_clone(l)?), l.shape().clone())),
            _ => candle_core::bail!("all-to-all: unexpected result layout"),
        }
    }
}

impl CustomOp1 for AllToAll {
    fn name(&self) -> &'static str {
        "ep-all-to-all"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        match self.owned()? {
            (Storage::Cpu(c), s) => Ok((c, s)),
            _ => candle_core::bail!("all-to-all: result not on the CPU"),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        if self.result.is_none() {
            let out = self.comm.all_to_all_cuda(s, l, &self.send_rows, &self.recv_rows)?;
            let mut dims = l.dims().to_vec();
            dims[0] = self.recv_rows.iter().sum();
            return Ok((out, Shape::from(dims)));
        }
        match self.owned()? {
            (Storage::Cuda(c), s) => Ok((c, s)),
            _ => candle_core::bail!("all-to-all: result not on the GPU"),
        }
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let op = AllToAll::new(&self.comm, &g, &self.recv_rows, &self.send_rows)?;
        Ok(Some(g.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use lockstep_collective::CollectiveError;

    use crate::ranks::run_ranks;

    /// A rank that fails leaves the others' EP collectives with the typed abort naming it: in
    /// the forward's dispatch (as `ModelError::Collective`), and inside candle's backward (the
    /// all-to-all op's reverse exchange, as a candle error that carries it).
    #[test]
    fn an_abort_stays_typed_in_the_forward_and_the_backward() {
        let dev = Device::Cpu;
        let all = run_ranks(2, |c| -> std::result::Result<ModelError, String> {
            if c.rank() == 1 {
                return Err("rank 1 fails first".into());
            }
            let ep = ExpertParallelism { comm: Arc::new(c), num_experts: 4 };
            let x = Tensor::ones((2, 3), DType::F32, &dev).map_err(|e| e.to_string())?;
            let token_A = Tensor::new(&[0u32, 1], &dev).map_err(|e| e.to_string())?;
            let expert_A = Tensor::new(&[0u32, 3], &dev).map_err(|e| e.to_string())?;
            ep.dispatch(0, &x, &token_A, &expert_A, ExpertsBackend::Reference).map(|_| unreachable!("rank 1 took no part")).or_else(Ok)
        });
        let e = all.into_iter().next().unwrap().unwrap().unwrap();
        assert!(matches!(&e, ModelError::Collective(CollectiveError::Aborted { rank: 1, cause }) if cause == "rank 1 fails first"), "{e:?}");

        let all = run_ranks(2, |c| -> std::result::Result<candle_core::Error, String> {
            let rank = c.rank();
            let comm: Arc<dyn Collective> = Arc::new(c);
            let x = Var::ones((2, 3), DType::F32, &dev).map_err(|e| e.to_string())?;
            let y = AllToAll::apply(&comm, x.as_tensor(), &[1, 1], &[1, 1]).map_err(|e| e.to_string())?;
            if rank == 1 {
                return Err("rank 1 fails before its backward".into());
            }
            let loss = y.sum_all().map_err(|e| e.to_string())?;
            loss.backward().map(|_| unreachable!("rank 1 took no part")).or_else(Ok)
        });
        let e = all.into_iter().next().unwrap().unwrap().unwrap();
        let found = CollectiveError::in_candle(&e);
        assert!(matches!(found, Some(CollectiveError::Aborted { rank: 1, cause }) if cause == "rank 1 fails before its backward"), "{e:?}");
    }
}
