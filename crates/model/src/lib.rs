#![allow(non_snake_case)] // shape-suffixed names (x_BTD, ids_NK) are the convention here
//! lockstep-model: Mixture-of-Experts causal LMs on candle whose forward can compute, record or
//! replay routes, per MoE layer.
//!
//! Shape-suffix legend used across the crate (torchtitan style):
//! B batch rows · T slots per row · N = B·T tokens (batch-major) · D hidden · V vocab ·
//! H query heads · G kv heads · Dh head dim · E experts · K experts per token ·
//! F expert intermediate · A (token, expert) assignments.
//!
//! Layout: `config` (HF config.json) · `checkpoint` (safetensors loading) · `init` (embedded
//! default and the other presets) · `device` (device and dtype by name) · `batch` (padded /
//! packed input) · `nn` (norm, rope, attention, mlp) ·
//! `moe` (route → dispatch → experts → combine) · `routing` (compute / record / replay plan) ·
//! `model` (the causal LM) · `metrics` (routing health).

pub mod accumulate;
pub mod adamw;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod init;
pub mod kv_cache;
pub mod limits;
pub mod gumbel;
pub mod head_grad;
pub mod logprobs;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod moe;
pub mod nn;
pub mod params;
pub mod parity;
pub mod routing;
pub mod shards;
pub mod validate;

pub use batch::Batch;
pub use config::ModelConfig;
pub use device::{memory_info, memory_peak, parse_dtype, to_host_f32, DeviceSpec};
pub use error::{ModelError, ParseError, Result};
pub use kv_cache::{KvPool, PagedSeq};
pub use model::{ForwardContext, ForwardOutput, MoeCausalLm};
pub use nn::Kernels;
pub use routing::{LayerRoute, Recording, Replay, ReplayWeights, RouteMode, RoutingPlan, ROUTE_FREE};
