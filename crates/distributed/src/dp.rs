//! Data parallelism around expert parallelism: every rank keeps the replicated parameters
//! (attention, norms, routers, embeddings, shared experts) and its shard of every MoE layer's
//! experts; after the backward, the replicated parameters' gradients are summed over the ranks
//! (the loss of each rank already divided by the *global* normaliser), the expert gradients are
//! the rank's own (every token that used an expert sent its gradient there), so an optimizer
//! step on each rank gives identical replicated weights everywhere ([`step`]: the gradient
//! norm for clipping is reduced over the ranks too, so every rank clips by the same factor).

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use lockstep_collective::{Collective, Result as CollectiveResult};
use lockstep_model::moe::experts::Experts;
use lockstep_model::moe::parallel::ExpertParallel;
use lockstep_model::moe::MoeBlock;
use lockstep_model::{ModelError, MoeCausalLm, Result};
use lockstep_trainer::optim::{grad_sq_sum, AdamW, GradAccumulator, StepStats};
use lockstep_trainer::parallel::DataParallel;
use lockstep_trainer::Result as TrainResult;

use crate::ep::ExpertParallelism;

/// Keep this rank's experts of every MoE layer (rank r: experts r·L .. (r+1)·L, L = E / world)
/// and route their tokens through `comm`.
pub fn shard_experts(model: &mut MoeCausalLm, comm: Arc<dyn Collective>) -> Result<()> {
    let (w, r) = (comm.world_size(), comm.rank());
    let e = model.cfg.moe.router.num_experts;
    if w == 0 || e % w != 0 {
        return Err(ModelError::config("<ranks>", "world_size", format!("{w} ranks do not divide the {e} experts of every MoE layer")));
    }
    let ep: Arc<dyn ExpertParallel> = Arc::new(ExpertParallelism { comm, num_experts: e });
    for layer in model.cfg.moe_layers.clone() {
        let block = model.moe_block_checked_mut(layer)?;
        shard_block(block, ep.clone(), r, w).map_err(|m| ModelError::config("<ranks>", "experts", format!("layer {layer}: {m}")))?;
    }
    Ok(())
}

/// One MoE block: keep rank `rank`'s experts of `world` equal shards, route through `ep`.
pub fn shard_block(block: &mut MoeBlock, ep: Arc<dyn ExpertParallel>, rank: usize, world: usize) -> std::result::Result<(), String> {
    let e = block.experts.num_experts();
    if block.expert_parallel.is_some() {
        return Err("already sharded".into());
    }
    if world == 0 || e % world != 0 || rank >= world {
        return Err(format!("{world} ranks do not divide the {e} experts (rank {rank})"));
    }
    let l = e / world;
    let narrow = |t: &Tensor| t.narrow(0, rank * l, l).and_then(|t| t.contiguous()).map_err(|e| e.to_string());
    let kernels = block.experts.kernels();
    let mut local = Experts::from_stacked(narrow(&block.experts.gate_up_proj)?, narrow(&block.experts.down_proj)?).map_err(|e| e.to_string())?;
    local.set_kernels(kernels);
    block.experts = local;
    block.expert_parallel = Some(ep);
    Ok(())
}

/// Whether a parameter name is a (sharded) expert weight, whose gradient stays on its rank.
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// Sum the gradients of the replicated parameters over the ranks, in place. Every rank must
/// call it with the same parameters in the same order; a parameter without a gradient on this
/// rank contributes zeros (another rank may have one).
pub fn all_reduce_grads(comm: &dyn Collective, params: &[(String, Var)], grads: &mut GradAccumulator) -> Result<()> {
    for (name, var) in params {
        if is_expert_param(name) {
            continue;
        }
        let g = match grads.get(name) {
            Some(g) => g.clone(),
            None => Tensor::zeros(var.shape(), var.dtype(), var.device())?,
        };
        grads.set(name, comm.all_reduce_sum(&g)?);
    }
    Ok(())
}

/// The global gradient norm over the ranks: the replicated gradients (after
/// [`all_reduce_grads`], the same on every rank) once, plus every rank's expert shards; the
/// per-rank sums are added in rank order, so every rank gets the same number.
pub fn global_grad_norm(comm: &dyn Collective, params: &[(String, Var)], grads: &GradAccumulator) -> Result<f64> {
    let names = || params.iter().map(|(n, _)| n.as_str());
    let replicated = grad_sq_sum(names().filter(|n| !is_expert_param(n)), grads).map_err(train_err)?;
    let experts = grad_sq_sum(names().filter(|n| is_expert_param(n)), grads).map_err(train_err)?;
    let all = comm.all_gather_host(&[experts])?;
    Ok((replicated + all.iter().map(|v| v[0]).sum::<f64>()).sqrt())
}

/// One data-parallel optimizer step on this rank: sum the replicated gradients over the
/// ranks, clip against the global norm, update. Every rank calls it with the same parameters
/// in the same order; the replicated parameters then stay identical on every rank. Returns the
/// step's statistics (the global norm) and the gradients it applied.
pub fn step(comm: &dyn Collective, opt: &mut AdamW, params: &[(String, Var)], grads: GradStore) -> Result<(StepStats, GradAccumulator)> {
    let mut acc = GradAccumulator::default();
    acc.add(params, &grads).map_err(train_err)?;
    all_reduce_grads(comm, params, &mut acc)?;
    let norm = global_grad_norm(comm, params, &acc)?;
    let stats = opt.apply_with_grad_norm(params, &acc, norm).map_err(train_err)?;
    Ok((stats, acc))
}

pub(crate) fn train_err(e: lockstep_trainer::TrainError) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("optimizer step: {e}")))
}

/// A trainer's view of the ranks ([`lockstep_trainer::parallel::DataParallel`]) over a
/// collective: its collectives are `comm`'s, experts sharded by [`shard_experts`], replicated
/// gradients summed by [`all_reduce_grads`]'s rule, the gradient norm by [`global_grad_norm`]'s.
#[derive(Debug, Clone)]
pub struct RankGroup {
    pub comm: Arc<dyn Collective>,
}

impl RankGroup {
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        Self { comm }
    }
}

impl Collective for RankGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_to_all_rows(&self, send: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> CollectiveResult<Tensor> {
        self.comm.all_to_all_rows(send, send_rows, recv_rows)
    }
    fn exchange_counts(&self, counts: &[usize]) -> CollectiveResult<Vec<usize>> {
        self.comm.exchange_counts(counts)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> CollectiveResult<Tensor> {
        self.comm.all_reduce_sum(t)
    }
    fn all_gather_host(&self, values: &[f64]) -> CollectiveResult<Vec<Vec<f64>>> {
        self.comm.all_gather_host(values)
    }
    fn all_gather_rows(&self, t: &Tensor) -> CollectiveResult<Tensor> {
        self.comm.all_gather_rows(t)
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> CollectiveResult<Tensor> {
        self.comm.reduce_scatter_sum(t)
    }
    fn exchanges_cuda_storage(&self) -> bool {
        self.comm.exchanges_cuda_storage()
    }
    fn all_to_all_cuda(&self, send: &candle_core::CudaStorage, layout: &candle_core::Layout, send_rows: &[usize], recv_rows: &[usize])
        -> CollectiveResult<candle_core::CudaStorage> {
        self.comm.all_to_all_cuda(send, layout, send_rows, recv_rows)
    }
}

impl DataParallel for RankGroup {
    fn shard_model(&self, model: &mut MoeCausalLm) -> TrainResult<()> {
        Ok(shard_experts(model, self.comm.clone())?)
    }
    fn is_sharded(&self, name: &str) -> bool {
        is_expert_param(name)
    }
    fn reduce_grads(&self, params: &[(String, Var)], grads: &mut GradAccumulator) -> TrainResult<f64> {
        all_reduce_grads(self.comm.as_ref(), params, grads)?;
        Ok(global_grad_norm(self.comm.as_ref(), params, grads)?)
    }
}
