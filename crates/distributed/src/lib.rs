#![allow(non_snake_case)] // shape-suffixed names (x_ND, token_A), legend atop each file
//! Beyond one device: expert parallelism (EP) and data parallelism (DP) for lockstep models,
//! kept apart from the single-device model code (which only exposes the seam
//! `lockstep_model::moe::parallel::ExpertParallel`).
//!
//! - `collective`: what EP and DP need from a process group (row all-to-all, count exchange,
//!   sum all-reduce, host all-gather); `local` implements it with threads in one process (the
//!   CPU tests and `train --ranks N`; the 2-rank == 1-rank checks run in CI on it; `run_ranks`
//!   aborts the group when a rank fails).
//! - `ep`: the MoE experts stage across ranks — dispatch by all-to-all to the experts' owners,
//!   local grouped experts, combine by the reverse all-to-all — with its backward.
//! - `dp`: sharding a model's experts over the ranks, the gradient all-reduce of the
//!   replicated parameters, and `RankGroup`, the trainer's view of the ranks
//!   (`lockstep_trainer::parallel::DataParallel`) that the RL loop runs over.
//! - `metrics`: routing health reduced over ranks.
//! - `nccl` (feature `nccl`): the NCCL process group, one process per GPU, bootstrapped by
//!   `lockstep launch` through the variables of `launch_env`.
//! - `check`: the "W ranks equal one rank" comparison, on any process group.

pub mod check;
pub mod collective;
pub mod dp;
pub mod ep;
pub mod launch_env;
pub mod local;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use collective::Collective;
pub use dp::{all_reduce_grads, shard_experts, RankGroup};
pub use ep::ExpertParallelism;
pub use local::{local_group, run_ranks, LocalComm};
