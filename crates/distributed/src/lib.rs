#![allow(non_snake_case)] // shape-suffixed names (x_ND, token_A), legend atop each file
//! Beyond one device: expert parallelism (EP) and data parallelism (DP) for lockstep models, on
//! the one multi-rank trait, `lockstep_collective::Collective` (row all-to-all, count exchange,
//! sum all-reduce, host all-gather; its error tells an aborted rank from a failed one). The
//! single-device model code only exposes its experts stage (`lockstep_model::moe::parallel::
//! ExpertParallel`), the trainer what it asks of the ranks (`lockstep_trainer::parallel::
//! DataParallel`, an extension of `Collective`).
//!
//! - `local`: the collectives over threads in one process (the CPU tests and `train --ranks N`;
//!   the 2-rank == 1-rank checks run in CI on it); a failed rank aborts the group.
//! - `nccl` (feature `nccl`): the collectives over NCCL, one process per GPU, with the unique
//!   id rank 0 made (`launch_env`: published in the store, or handed over).
//! - `tcp`: the collectives over TCP between processes, for CPU ranks (a star through rank 0,
//!   sums in rank order as `local`'s).
//! - `rendezvous`: a process's rank, world size and rank 0's address from its launcher's
//!   variables (lockstep's, torchrun's, SLURM's); `store`: the small TCP key-value store rank 0
//!   hosts there, where the ranks meet.
//! - `ranks`: running a group — `run_threads` (thread ranks; the first failed rank's error
//!   wins over the others' aborts), `Launch` (this process as a rank its launcher started:
//!   CPU ranks over TCP, GPU ranks over NCCL), `join_launched` (an NCCL rank).
//! - `ep`: the MoE experts stage across ranks — dispatch by all-to-all to the experts' owners,
//!   local grouped experts, combine by the reverse all-to-all — with its backward.
//! - `dp`: sharding a model's experts over the ranks, the gradient all-reduce of the
//!   replicated parameters, and `RankGroup`, the trainer's `DataParallel` over a collective,
//!   that the RL loop runs over.
//! - `metrics`: routing health reduced over ranks.
//! - `check`: the "W ranks equal one rank" comparison, on any process group.

pub mod check;
pub mod dp;
pub mod ep;
pub mod launch_env;
pub mod local;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ranks;
pub mod rendezvous;
pub mod store;
pub mod tcp;

/// The one multi-rank trait and its error, re-exported (`lockstep_dist::collective::Result`, ...).
pub use lockstep_collective as collective;
pub use dp::{all_reduce_grads, shard_experts, RankGroup};
pub use ep::ExpertParallelism;
pub use local::{local_group, LocalComm};
pub use lockstep_collective::{Collective, CollectiveError};
pub use ranks::{run_ranks, run_threads};
