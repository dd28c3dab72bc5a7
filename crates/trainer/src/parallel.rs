//! A trainer spread over ranks: expert parallelism for the MoE experts, data parallelism for
//! the rest. [`DataParallel`] extends the one multi-rank trait, `lockstep_collective::Collective`
//! (rank, world size, host all-gather, ...), with what the trainer asks of the ranks beyond it:
//! shard the model's experts, reduce the gradients. `lockstep_dist::dp::RankGroup` implements it
//! over any collective (NCCL across GPUs, or threads in one process).
//!
//! What a parallel step does (every rank calls it with its share of the global batch):
//! - the loss normaliser (completion tokens) is summed over the ranks, so the ranks' losses
//!   add up to the single-rank loss;
//! - ranks with fewer micro-batches run empty ones (loss mask 0), because every forward and
//!   backward through an expert-parallel layer is a collective all ranks take part in;
//! - after the backward, [`DataParallel::reduce_grads`] sums the replicated gradients and
//!   returns the global gradient norm, so every rank clips by the same factor;
//! - the step's metrics are reduced over the ranks (sums, token-weighted means, loads summed).
//! - with `TrainerConfig::shard_optimizer`, the replicated gradients are reduce-scattered
//!   instead and each rank updates only its 1/W slice of their optimizer state, all-gathering
//!   the updated weights ([`crate::zero`]).
//!
//! Checkpoints stay ordinary single-rank checkpoints: saving gathers the expert shards (and
//! their optimizer moments) onto rank 0, which writes; resuming loads the whole checkpoint on
//! every rank and keeps each rank's shard. So a run can resume with a different number of ranks.

use std::sync::Arc;

use candle_core::{Tensor, Var};
pub use lockstep_collective::{sum_over_ranks, Collective, CollectiveError};
use lockstep_model::{ModelError, MoeCausalLm};

use crate::error::Result;
use crate::optim::GradAccumulator;

/// The ranks as the trainer sees them: a [`Collective`] that also shards a model and reduces
/// its gradients.
pub trait DataParallel: Collective {
    /// Keep this rank's experts of every MoE layer of a whole model (every rank loaded the
    /// same) and route their tokens over the ranks.
    fn shard_model(&self, model: &mut MoeCausalLm) -> Result<()>;
    /// Whether a parameter is an expert shard (rows of the whole tensor) rather than replicated.
    fn is_sharded(&self, name: &str) -> bool;
    /// This rank's rows of a whole sharded tensor (dim 0 split in equal parts, rank order).
    fn local_rows(&self, whole: &Tensor) -> Result<Tensor> {
        let (w, r, n) = (self.world_size(), self.rank(), whole.dim(0)?);
        if n % w != 0 {
            return Err(ModelError::config("<ranks>", "world_size", format!("{w} ranks do not divide {n} rows")).into());
        }
        Ok(whole.narrow(0, r * n / w, n / w)?.contiguous()?)
    }
    /// The whole tensor from every rank's shard (dim 0, rank order). A collective.
    fn gather_rows(&self, shard: &Tensor) -> Result<Tensor> {
        Ok(self.all_gather_rows(shard)?)
    }
    /// Sum the replicated parameters' gradients over the ranks (in place; a parameter without
    /// a gradient here counts as zeros) and return the global gradient norm. A collective.
    fn reduce_grads(&self, params: &[(String, Var)], grads: &mut GradAccumulator) -> Result<f64>;
}

pub type Parallel = Option<Arc<dyn DataParallel>>;
