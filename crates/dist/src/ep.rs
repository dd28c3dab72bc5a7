//! Expert parallelism: experts sharded over the ranks (rank r owns experts r·L .. (r+1)·L,
//! L = E / world), tokens moved to their experts' owners and back, as the named stages
//!
//! ```text
//! route (local, replicated router) → dispatch: order assignments by owner, all-to-all
//!   (counts first, then rows + local expert ids) → experts: this rank's grouped experts
//!   (`local_experts`, the single-device stage) → combine: reverse all-to-all, weight, sum
//!   per token
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
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result as CResult, Shape, Storage, Tensor};
use lockstep_model::moe::experts::Experts;
use lockstep_model::moe::parallel::{local_experts, ExpertParallel};
use lockstep_model::{ModelError, Result};

use crate::collective::Collective;

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
    /// rows received, one per assignment to this rank's experts, grouped by source rank
    pub x_RD: Tensor,
    /// the local expert (0..L) of each received row
    pub ids_R: Tensor,
    pub send_rows: Vec<usize>,
    pub recv_rows: Vec<usize>,
    home: Home,
    n: usize,
    d: usize,
}

/// How the sent assignments map back to the route's order.
#[derive(Debug, Clone)]
enum Home {
    /// CPU: `perm_A[i]` = the route's assignment sent i-th, `tok_A` its token
    Host { perm_A: Tensor, tok_A: Tensor },
    /// CUDA: the owner-grouped rows of the device plan (gather / f32 combine in route order)
    #[cfg(feature = "cuda")]
    Device(lockstep_model::gpu::RowGroups),
}

impl ExpertParallelism {
    /// dispatch: order the assignments by owner rank (stable), exchange the counts, then the
    /// rows and their local expert ids.
    pub fn dispatch(&self, layer: usize, x_ND: &Tensor, token_A: &Tensor, expert_A: &Tensor) -> Result<Dispatched> {
        let (n, d) = x_ND.dims2()?;
        let w = self.comm.world_size();
        let l = self.experts_per_rank();
        let dev = x_ND.device();
        // the experts' host copy gives the counts (they must reach the host to size the
        // exchange anyway) and the local ids
        let exp: Vec<u32> = expert_A.to_vec1()?;
        let mut send_rows = vec![0usize; w];
        let mut owner_A = Vec::with_capacity(exp.len());
        for &e in &exp {
            let owner = e as usize / l;
            if owner >= w {
                return Err(err(layer, format!("expert id {e} >= num_experts {}", self.num_experts)));
            }
            send_rows[owner] += 1;
            owner_A.push(owner as u32);
        }
        let a = exp.len();
        // local ids in the stable owner order (and, on the host path, that order itself)
        let mut next = crate::collective::offsets(&send_rows);
        let mut perm = vec![0u32; a];
        let mut local_ids = vec![0u32; a];
        for (i, (&e, &o)) in exp.iter().zip(&owner_A).enumerate() {
            let dst = next[o as usize];
            next[o as usize] += 1;
            perm[dst] = i as u32;
            local_ids[dst] = e - o * l as u32;
        }
        let (x_AD, home) = if dev.is_cuda() {
            // the device plan groups the rows itself (same stable order)
            self.device_home(layer, x_ND, token_A, owner_A, &send_rows)?
        } else {
            let tok: Vec<u32> = token_A.to_vec1()?;
            let tok_A = Tensor::from_vec(perm.iter().map(|&i| tok[i as usize]).collect::<Vec<_>>(), a, dev)?;
            let perm_A = Tensor::from_vec(perm, a, dev)?;
            (x_ND.index_select(&tok_A, 0)?, Home::Host { perm_A, tok_A })
        };
        let recv_rows = self.comm.exchange_counts(&send_rows)?;
        let ids_R = self.comm.all_to_all_rows(&Tensor::from_vec(local_ids, a, dev)?, &send_rows, &recv_rows)?;
        let x_RD = AllToAll::apply(&self.comm, &x_AD, &send_rows, &recv_rows)?;
        Ok(Dispatched { x_RD, ids_R, send_rows, recv_rows, home, n, d })
    }

    #[cfg(feature = "cuda")]
    fn device_home(&self, layer: usize, x_ND: &Tensor, token_A: &Tensor, owner_A: Vec<u32>, send_rows: &[usize]) -> Result<(Tensor, Home)> {
        let a = owner_A.len();
        let owner_A = Tensor::from_vec(owner_A, a, x_ND.device())?;
        let groups = lockstep_model::gpu::RowGroups::new(token_A, &owner_A, x_ND.dim(0)?, send_rows.len())?;
        if groups.counts() != send_rows {
            return Err(err(layer, format!("device plan counts {:?} differ from the host's {send_rows:?}", groups.counts())));
        }
        Ok((groups.gather(x_ND)?, Home::Device(groups)))
    }

    #[cfg(not(feature = "cuda"))]
    fn device_home(&self, layer: usize, _: &Tensor, _: &Tensor, _: Vec<u32>, _: &[usize]) -> Result<(Tensor, Home)> {
        Err(err(layer, "CUDA tensors need the `cuda` feature".into()))
    }

    /// experts: one row per received assignment through this rank's grouped experts, weight 1
    /// (the weights are applied at home, in `combine`).
    pub fn experts(&self, dispatched: &Dispatched, local: &Experts) -> Result<Tensor> {
        let x_RD = &dispatched.x_RD;
        let r = x_RD.dim(0)?;
        if r == 0 {
            // keeps x_RD in the graph, so this rank joins the backward exchange like the others
            return Ok((x_RD * 0.0)?);
        }
        let dev = x_RD.device();
        let rows = Tensor::arange(0u32, r as u32, dev)?;
        let ones = Tensor::ones(r, DType::F32, dev)?;
        local_experts(x_RD, &rows, &dispatched.ids_R, &ones, local)
    }

    /// combine: the results back to their tokens' ranks, weighted, summed per token (on the
    /// GPU in ascending route order and f32, like the single-device combine).
    pub fn combine(&self, dispatched: &Dispatched, y_RD: &Tensor, weight_A: &Tensor) -> Result<Tensor> {
        let Dispatched { send_rows, recv_rows, home, n, d, .. } = dispatched;
        let y_AD = AllToAll::apply(&self.comm, y_RD, recv_rows, send_rows)?;
        match home {
            Home::Host { perm_A, tok_A } => {
                let w_A1 = weight_A.index_select(perm_A, 0)?.to_dtype(y_AD.dtype())?.unsqueeze(1)?;
                Ok(Tensor::zeros((*n, *d), y_AD.dtype(), y_AD.device())?.index_add(tok_A, &y_AD.broadcast_mul(&w_A1)?, 0)?)
            }
            #[cfg(feature = "cuda")]
            Home::Device(groups) => Ok(groups.combine(&y_AD, weight_A)?),
        }
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
        let dispatched = self.dispatch(layer, x_ND, token_A, expert_A)?;
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
    fn new(comm: &Arc<dyn Collective>, x: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> CResult<Self> {
        #[cfg(feature = "cuda")]
        let direct = x.device().is_cuda() && comm.exchanges_cuda_storage();
        #[cfg(not(feature = "cuda"))]
        let direct = false;
        let result = if direct { None } else { Some(comm.all_to_all_rows(x, send_rows, recv_rows)?.contiguous()?) };
        Ok(AllToAll { comm: comm.clone(), send_rows: send_rows.to_vec(), recv_rows: recv_rows.to_vec(), result })
    }

    fn apply(comm: &Arc<dyn Collective>, x: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> CResult<Tensor> {
        let op = Self::new(comm, x, send_rows, recv_rows)?;
        x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
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
