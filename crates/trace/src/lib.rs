//! Route transport for routing replay: compact, token-aligned, checksummed expert routes.
//!
//! * [`RouteTrace`]: one sequence's routes (`[token][moe_layer][k]`, explicit missing rows,
//!   optional router probabilities, policy version / config fingerprint).
//! * [`format`]: the `.lstrace` file (streaming blocks, CRC32, index, mmap reader).
//! * [`interop`]: vLLM (`.npy` / nested JSON), SGLang (base64 int32), prime-rl payloads.
//! * [`pack`]: samples into token-budget micro-batches with route rows aligned, and back.
//! * [`stats`]: per-layer expert load histograms, `max_vio`, missing rows.

mod bytes;
pub mod codec;
mod error;
pub mod format;
pub mod interop;
pub mod npy;
pub mod pack;
mod probs;
pub mod stats;
mod trace;

pub use codec::IdCodec;
pub use error::{Result, TraceError};
pub use format::{decode_block, encode_block, encode_file, scan_blocks, DecodeLimits, Reader, Writer};
pub use probs::{ProbDtype, Probs};
pub use trace::{fingerprint_of, RouteTrace, TraceMeta, MAX_EXPERTS, MISSING_ID};

/// Sentinel expert id for "route freely" rows in packed micro-batches (padding tokens, missing
/// rows, samples without routes): every id of such a row is `ROUTE_FREE` and its
/// `route_free` flag is set. Same value as `lockstep_model::ROUTE_FREE`.
pub const ROUTE_FREE: u32 = u32::MAX;
