//! lockstep-trainer: the trainer side of routing replay — log-probabilities from the shared
//! forward, RL losses (token and joint token+expert importance sampling), gradients checked
//! against PyTorch, AdamW, checkpoints.
//!
//! Legend: B rows, T slots per row, N = B·T, V vocab.
#![allow(non_snake_case)]

pub mod batch;
pub mod checkpoint;
pub mod error;
pub mod grads;
mod health;
/// Token log-probabilities: the model crate's, shared with the engine.
pub use lockstep_model::logprobs;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod phases;
pub mod parallel;
pub mod route_terms;
pub mod staged;
pub mod step_inputs;
pub mod step_metrics;
pub mod trainer;
pub mod zero;

pub use error::{Result, TrainError};
