//! Route transport for routing replay: compact, token-aligned, checksummed expert routes.
//!
//! * [`RouteTrace`]: one sequence's routes (`[token][moe_layer][k]`, explicit missing rows,
//!   optional router probabilities, policy version / config fingerprint).
//! * [`format`](mod@format): the `.lstrace` file (streaming blocks, CRC32, index, mmap reader).
//! * [`interop`]: vLLM (current base64 `.npy`, 0.21 nested lists, whole responses), SGLang
//!   (`/generate` `meta_info`), prime-rl (inference payload, `/generate`, msgpack transport);
//!   [`interop::ModelLayout`] from `config.json` maps decoder-layer columns to MoE layers.
//! * [`pack`]: samples into token-budget micro-batches with route rows aligned, and back.
//! * [`stats`]: per-layer expert load histograms, `max_vio`, missing rows.
//!
//! Size and speed (`cargo bench -p lockstep-trace --bench trace`, 32K tokens x 48 MoE layers x
//! top-8 of 128 experts, one core): expert *sets* (`ordered: false`) take 246.1 bytes/token
//! (uint8: 384, int32: 1536, k-subset bound 242.3), selection *order* (`ordered: true`, what
//! vLLM / SGLang / prime-rl carry) 336.1 bytes/token; both decode at > 300 MB/s of
//! uint8-equivalent ids (a 32K-token sample in about 40 ms).
//!
//! ```
//! use lockstep_trace::{decode_block, encode_block, DecodeLimits, RouteTrace, TraceMeta};
//! // 3 tokens, MoE layers 1 and 3, top-2 of 8 experts; token 2's routes were not provided
//! let meta = TraceMeta { num_experts: 8, top_k: 2, prompt_len: 1, fingerprint: 7, policy_version: 12, ordered: true };
//! let ids = vec![5, 1, 0, 7, 2, 3, 4, 6, 0, 0, 0, 0];
//! let t = RouteTrace::new(meta, vec![1, 3], 3, ids, vec![false, false, true], None)?;
//! assert_eq!(t.row(0, 1), Some(&[0u16, 7][..]));
//! assert_eq!(t.row(2, 0), None); // missing, never zero-filled
//! let (back, _) = decode_block(&encode_block(&t), "block", DecodeLimits::default())?;
//! assert!(back.bits_eq(&t));
//! back.check_policy(12, 7)?;
//! # Ok::<(), lockstep_trace::TraceError>(())
//! ```

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
