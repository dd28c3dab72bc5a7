//! The `.lstrace` binary file format (version 1). All integers little-endian.
//!
//! ```text
//! file   := header block* index footer
//! header := b"LSTRACE\0" | version u32 (=1) | flags u32 (=0)                       16 bytes
//! block  := b"LSQB" | body_len u64 | body | crc32(body) u32
//! body   := num_experts u32 | top_k u32 (0 = variable) | num_tokens u32 | prompt_len u32
//!         | fingerprint u64 | policy_version u64
//!         | flags u8 (bit0 ordered, bit1 has_probs) | codec u8 | prob_dtype u8 (0 none,1 f32,2 bf16,3 f16) | 0 u8
//!         | num_layers u32 | layer ids u32 x num_layers
//!         | missing bitmap ceil(num_tokens / 8) bytes (bit t%8 of byte t/8 set = token t missing)
//!         | ids_len u64 | ids (see [`crate::codec`]) | probs_len u64 | probs (LE, one per present id)
//! index  := b"LSQX" | count u64 | (offset u64 | block_len u64 | num_tokens u64) x count | crc32 u32
//! footer := index_offset u64 | index_len u64 | b"LSTREND\0"                            24 bytes
//! ```
//!
//! Blocks are appended as sequences stream in; the index and footer are written by
//! [`Writer::finish`] (and rewritten by [`Writer::append`]). [`Reader`] maps the file and uses
//! the index for random access; [`scan_blocks`] recovers the blocks of a file whose index was
//! never written.

mod block;
mod index;
mod reader;
mod writer;

pub use block::{decode_block, encode_block, DecodeLimits};
pub use index::IndexEntry;
pub use reader::{scan_blocks, Reader};
pub use writer::{encode_file, Writer};

/// File magic.
pub const FILE_MAGIC: &[u8; 8] = b"LSTRACE\0";
/// Footer magic.
pub const END_MAGIC: &[u8; 8] = b"LSTREND\0";
/// Block magic.
pub const BLOCK_MAGIC: &[u8; 4] = b"LSQB";
/// Index magic.
pub const INDEX_MAGIC: &[u8; 4] = b"LSQX";
/// Format version written and read by this build.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Footer length.
pub const FOOTER_LEN: usize = 24;

fn magic_str(b: &[u8]) -> String {
    b.iter().map(|&c| if c.is_ascii_graphic() { (c as char).to_string() } else { format!("\\x{c:02x}") }).collect()
}
