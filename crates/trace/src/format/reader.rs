//! Random-access reader over a memory-mapped (or in-memory) `.lstrace` file.

use super::block::{decode_block, DecodeLimits};
use super::index::{decode_tail, IndexEntry};
use super::{magic_str, FILE_MAGIC, HEADER_LEN, INDEX_MAGIC, VERSION};
use crate::bytes::Cursor;
use crate::error::{Result, TraceError};
use crate::trace::RouteTrace;
use std::path::Path;

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// Checks magic and version of the file header.
pub(crate) fn check_header(data: &[u8]) -> Result<()> {
    let mut c = Cursor::new(data, "header");
    let magic = c.take(8, "magic")?;
    if magic != FILE_MAGIC {
        return Err(TraceError::BadMagic {
            field: "header.magic".into(),
            expected: magic_str(FILE_MAGIC),
            found: magic_str(magic),
        });
    }
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(TraceError::Version { field: "header.version".into(), found: version, supported: VERSION });
    }
    let flags = c.u32("flags")?;
    if flags != 0 {
        return Err(TraceError::invalid("header.flags", format!("unknown flags {flags:#x}")));
    }
    Ok(())
}

/// A finished `.lstrace` file: index read eagerly, blocks decoded (and CRC-checked) on demand.
pub struct Reader {
    data: Storage,
    entries: Vec<IndexEntry>,
    limits: DecodeLimits,
}

impl Reader {
    /// Maps `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let name = path.as_ref().display().to_string();
        let f = std::fs::File::open(path.as_ref()).map_err(|e| TraceError::io(name.clone(), e))?;
        let len = f.metadata().map_err(|e| TraceError::io(name.clone(), e))?.len();
        if len < HEADER_LEN as u64 {
            return Err(TraceError::Truncated { field: "header".into(), need: HEADER_LEN as u64, have: len });
        }
        // SAFETY: the map is read-only; the format treats its bytes as untrusted input, and the
        // caller must not truncate the file while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| TraceError::io(name.clone(), e))?;
        Self::from_storage(Storage::Mmap(map))
    }

    /// A reader over bytes already in memory.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self> {
        Self::from_storage(Storage::Owned(data))
    }

    fn from_storage(data: Storage) -> Result<Self> {
        let bytes = data.bytes();
        check_header(bytes)?;
        let (entries, _) = decode_tail(bytes)?;
        Ok(Reader { data, entries, limits: DecodeLimits::default() })
    }

    /// Replaces the allocation limits used when decoding blocks.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }
    /// Total file size in bytes.
    pub fn file_len(&self) -> usize {
        self.data.bytes().len()
    }
    /// Total tokens over all sequences (from the index).
    pub fn total_tokens(&self) -> u64 {
        self.entries.iter().map(|e| e.num_tokens).sum()
    }

    /// Decodes sequence `i`.
    pub fn get(&self, i: usize) -> Result<RouteTrace> {
        let e = self
            .entries
            .get(i)
            .ok_or_else(|| TraceError::invalid("index", format!("sequence {i} of {}", self.entries.len())))?;
        let ctx = format!("block[{i}]");
        let bytes = &self.data.bytes()[e.offset as usize..(e.offset + e.len) as usize];
        let (t, used) = decode_block(bytes, &ctx, self.limits)?;
        if used as u64 != e.len {
            return Err(TraceError::invalid(
                format!("index.entry[{i}].len"),
                format!("{} but block is {used} bytes", e.len),
            ));
        }
        if t.num_tokens as u64 != e.num_tokens {
            return Err(TraceError::invalid(
                format!("index.entry[{i}].num_tokens"),
                format!("{} but block has {}", e.num_tokens, t.num_tokens),
            ));
        }
        Ok(t)
    }

    /// Decodes every sequence in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<RouteTrace>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Index entries of the valid blocks at the front of a (possibly unfinished) file, and the
/// offset where they end.
pub(crate) fn scan_entries(data: &[u8], limits: DecodeLimits) -> Result<(Vec<IndexEntry>, u64)> {
    check_header(data)?;
    let mut pos = HEADER_LEN;
    let mut out = Vec::new();
    while pos < data.len() && !data[pos..].starts_with(INDEX_MAGIC) {
        match decode_block(&data[pos..], &format!("block[{}]", out.len()), limits) {
            Ok((t, used)) => {
                out.push(IndexEntry { offset: pos as u64, len: used as u64, num_tokens: t.num_tokens() as u64 });
                pos += used;
            }
            Err(_) => break,
        }
    }
    Ok((out, pos as u64))
}

/// Decodes the blocks of a (possibly unfinished) file front to back, without the index.
/// Returns the sequences read and the error that stopped the scan, if any (reaching the
/// index or the end of the data cleanly is not an error).
pub fn scan_blocks(data: &[u8], limits: DecodeLimits) -> (Vec<RouteTrace>, Option<TraceError>) {
    if let Err(e) = check_header(data) {
        return (Vec::new(), Some(e));
    }
    let mut pos = HEADER_LEN;
    let mut out = Vec::new();
    while pos < data.len() {
        if data[pos..].starts_with(INDEX_MAGIC) {
            break;
        }
        match decode_block(&data[pos..], &format!("block[{}]", out.len()), limits) {
            Ok((t, used)) => {
                out.push(t);
                pos += used;
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}
