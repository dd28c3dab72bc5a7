//! The trailing index (block offsets) and footer.

use super::{magic_str, END_MAGIC, FOOTER_LEN, HEADER_LEN, INDEX_MAGIC};
use crate::bytes::{put_u32, put_u64, Cursor};
use crate::error::{Result, TraceError};

/// Where one sequence block lives in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Byte offset of the block (its magic).
    pub offset: u64,
    /// Block length in bytes (magic to CRC inclusive).
    pub len: u64,
    /// Tokens of the sequence.
    pub num_tokens: u64,
}

/// Index followed by footer, for a file whose index starts at `index_offset`.
pub(crate) fn encode_tail(entries: &[IndexEntry], index_offset: u64) -> Vec<u8> {
    let mut idx = Vec::with_capacity(16 + entries.len() * 24);
    idx.extend_from_slice(INDEX_MAGIC);
    put_u64(&mut idx, entries.len() as u64);
    for e in entries {
        put_u64(&mut idx, e.offset);
        put_u64(&mut idx, e.len);
        put_u64(&mut idx, e.num_tokens);
    }
    let crc = crc32fast::hash(&idx);
    put_u32(&mut idx, crc);
    let index_len = idx.len() as u64;
    put_u64(&mut idx, index_offset);
    put_u64(&mut idx, index_len);
    idx.extend_from_slice(END_MAGIC);
    idx
}

/// Reads footer and index of a whole file; returns the entries and the index offset.
pub(crate) fn decode_tail(data: &[u8]) -> Result<(Vec<IndexEntry>, u64)> {
    let n = data.len();
    if n < HEADER_LEN + FOOTER_LEN {
        return Err(TraceError::Truncated {
            field: "footer".into(),
            need: (HEADER_LEN + FOOTER_LEN) as u64,
            have: n as u64,
        });
    }
    let mut f = Cursor::new(&data[n - FOOTER_LEN..], "footer");
    let index_offset = f.u64("index_offset")?;
    let index_len = f.u64("index_len")?;
    let magic = f.take(8, "magic")?;
    if magic != END_MAGIC {
        return Err(TraceError::BadMagic {
            field: "footer.magic (file truncated or never finished)".into(),
            expected: magic_str(END_MAGIC),
            found: magic_str(magic),
        });
    }
    let tail_start = (n - FOOTER_LEN) as u64;
    if index_offset < HEADER_LEN as u64 || index_offset.checked_add(index_len) != Some(tail_start) {
        return Err(TraceError::invalid(
            "footer.index_offset",
            format!("index at {index_offset} + {index_len} bytes does not end at the footer ({tail_start})"),
        ));
    }
    let idx = &data[index_offset as usize..tail_start as usize];
    if idx.len() < 4 {
        return Err(TraceError::Truncated { field: "index".into(), need: 4, have: idx.len() as u64 });
    }
    let (body, crc) = idx.split_at(idx.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(TraceError::Checksum { field: "index.crc32".into(), stored, computed });
    }
    let mut c = Cursor::new(body, "index");
    let magic = c.take(4, "magic")?;
    if magic != INDEX_MAGIC {
        return Err(TraceError::BadMagic {
            field: "index.magic".into(),
            expected: magic_str(INDEX_MAGIC),
            found: magic_str(magic),
        });
    }
    let count = c.u64("count")?;
    if count.checked_mul(24) != Some(c.remaining() as u64) {
        return Err(TraceError::invalid("index.count", format!("{count} entries do not fill {} bytes", c.remaining())));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut prev_end = HEADER_LEN as u64;
    for i in 0..count {
        let e = IndexEntry { offset: c.u64("offset")?, len: c.u64("len")?, num_tokens: c.u64("num_tokens")? };
        let end = e.offset.checked_add(e.len);
        if e.offset < prev_end || end.is_none_or(|x| x > index_offset) {
            return Err(TraceError::invalid(
                format!("index.entry[{i}]"),
                format!("block at {} (+{}) overlaps or lies outside the data region", e.offset, e.len),
            ));
        }
        prev_end = end.unwrap_or(index_offset);
        entries.push(e);
    }
    Ok((entries, index_offset))
}
