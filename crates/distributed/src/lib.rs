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
//! - `nccl` (feature `nccl`): the collectives over NCCL, one process per GPU, bootstrapped by
//!   `lockstep launch` through the variables of `launch_env`.
//! - `ranks`: running a group — `run_threads` (thread ranks; the first failed rank's error
//!   wins over the others' aborts), `join_launched` (this process's NCCL rank).
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

/// The one multi-rank trait and its error, re-exported (`lockstep_dist::collective::Result`, ...).
pub use lockstep_collective as collective;
pub use dp::{all_reduce_grads, shard_experts, RankGroup};
pub use ep::ExpertParallelism;
pub use local::{local_group, LocalComm};
pub use lockstep_collective::{Collective, CollectiveError};
pub use ranks::{run_ranks, run_threads};
