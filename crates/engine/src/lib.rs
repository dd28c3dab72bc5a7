#![allow(non_snake_case)] // shape-suffixed names (logits_RV: R running sequences, V vocab)
//! lockstep-engine: generation with continuous batching over a paged KV cache (block tables, prefix
//! sharing with routes, preemption by recomputation). Every
//! token's route (expert ids and their router probabilities, every MoE layer, prompt and
//! completion, no missing last row) comes back with the sampled tokens and their
//! log-probabilities. With the model's batch-invariant kernels those log-probabilities and
//! routes equal, bit for bit, what the trainer's packed forward computes for the same tokens.

pub mod blocks;
pub mod cache;
pub mod consistency;
pub mod engine;
pub mod error;
mod routes;
pub mod sampling;
mod seq;
mod step;

pub use cache::CacheConfig;
pub use engine::{Completion, Engine, FinishReason, Request, Sampled, StepTimes};
pub use error::{EngineError, Result};
pub use sampling::{Sampler, SamplingParams};
