//! A trainer spread over ranks: expert parallelism for the MoE experts, data parallelism for
//! the rest. The trainer only needs what this trait offers; `lockstep_dist::dp::RankGroup`
//! implements it over a collective (NCCL across GPUs, or threads in one process).
//!
//! What a parallel step does (every rank calls it with its share of the global batch):
//! - the loss normaliser (completion tokens) is summed over the ranks, so the ranks' losses
//!   add up to the single-rank loss;
//! - ranks with fewer micro-batches run empty ones (loss mask 0), because every forward and
//!   backward through an expert-parallel layer is a collective all ranks take part in;
//! - after the backward, [`DataParallel::reduce_grads`] sums the replicated gradients and
//!   returns the global gradient norm, so every rank clips by the same factor;
//! - the step's metrics are reduced over the ranks (sums, token-weighted means, loads summed).
//!
//! Checkpoints stay ordinary single-rank checkpoints: saving gathers the expert shards (and
//! their optimizer moments) onto rank 0, which writes; resuming loads the whole checkpoint on
//! every rank and keeps each rank's shard. So a run can resume with a different number of ranks.

use std::sync::Arc;

use candle_core::{Tensor, Var};
use lockstep_model::MoeCausalLm;

use crate::error::Result;
use crate::optim::GradAccumulator;

pub trait DataParallel: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `values`, in rank order (all ranks pass the same length).
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<Vec<f64>>>;
    /// Keep this rank's experts of every MoE layer of a whole model (every rank loaded the
    /// same) and route their tokens over the ranks.
    fn shard_model(&self, model: &mut MoeCausalLm) -> Result<()>;
    /// Whether a parameter is an expert shard (rows of the whole tensor) rather than replicated.
    fn is_sharded(&self, name: &str) -> bool;
    /// This rank's rows of a whole sharded tensor (dim 0 split in equal parts, rank order).
    fn local_rows(&self, whole: &Tensor) -> Result<Tensor>;
    /// The whole tensor from every rank's shard (dim 0, rank order). A collective.
    fn gather_rows(&self, shard: &Tensor) -> Result<Tensor>;
    /// Sum the replicated parameters' gradients over the ranks (in place; a parameter without
    /// a gradient here counts as zeros) and return the global gradient norm. A collective.
    fn reduce_grads(&self, params: &[(String, Var)], grads: &mut GradAccumulator) -> Result<f64>;
}

/// Element-wise sums of every rank's values.
pub fn sum_over_ranks(dp: &dyn DataParallel, values: &[f64]) -> Result<Vec<f64>> {
    let all = dp.all_gather_host(values)?;
    let mut sum = vec![0f64; values.len()];
    for r in &all {
        if r.len() != values.len() {
            return Err(crate::TrainError::input("<ranks>", format!("a rank sent {} values, {} expected", r.len(), values.len())));
        }
        for (s, x) in sum.iter_mut().zip(r) {
            *s += x;
        }
    }
    Ok(sum)
}

pub type Parallel = Option<Arc<dyn DataParallel>>;
