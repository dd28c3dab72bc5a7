//! Streaming writer: header, then one block per pushed sequence, then index + footer.

use super::block::encode_block;
use super::block::DecodeLimits;
use super::index::{decode_tail, encode_tail, IndexEntry};
use super::reader::{check_header, scan_entries};
use super::{FILE_MAGIC, HEADER_LEN, VERSION};
use crate::error::{Result, TraceError};
use crate::trace::RouteTrace;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Appends sequences to a `.lstrace` stream; call [`Writer::finish`] to write the index.
pub struct Writer<W: Write> {
    inner: W,
    offset: u64,
    entries: Vec<IndexEntry>,
    name: String,
}

impl<W: Write> Writer<W> {
    /// Writes the file header to `inner`.
    pub fn new(mut inner: W) -> Result<Self> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(FILE_MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        inner.write_all(&h).map_err(|e| TraceError::io("<stream>", e))?;
        Ok(Writer { inner, offset: HEADER_LEN as u64, entries: Vec::new(), name: "<stream>".into() })
    }

    /// Appends one sequence block.
    pub fn push(&mut self, trace: &RouteTrace) -> Result<()> {
        let block = encode_block(trace);
        self.inner.write_all(&block).map_err(|e| TraceError::io(self.name.clone(), e))?;
        self.entries.push(IndexEntry {
            offset: self.offset,
            len: block.len() as u64,
            num_tokens: trace.num_tokens as u64,
        });
        self.offset += block.len() as u64;
        Ok(())
    }

    /// Sequences written so far (including those of an appended-to file).
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes index and footer, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        let tail = encode_tail(&self.entries, self.offset);
        self.inner.write_all(&tail).map_err(|e| TraceError::io(self.name.clone(), e))?;
        self.inner.flush().map_err(|e| TraceError::io(self.name.clone(), e))?;
        Ok(self.inner)
    }
}

impl Writer<BufWriter<File>> {
    /// Creates (truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let name = path.as_ref().display().to_string();
        let f = File::create(path.as_ref()).map_err(|e| TraceError::io(name.clone(), e))?;
        let mut w = Writer::new(BufWriter::new(f))?;
        w.name = name;
        Ok(w)
    }

    /// Opens a file for appending: its index and footer are dropped and rewritten by
    /// [`Writer::finish`] with the old and new sequences. A file that was never finished (a
    /// writer died before `finish`) is recovered: its valid blocks are kept, a torn last
    /// block is cut off.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let name = path.as_ref().display().to_string();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.as_ref())
            .map_err(|e| TraceError::io(name.clone(), e))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data).map_err(|e| TraceError::io(name.clone(), e))?;
        check_header(&data)?;
        let (entries, index_offset) = match decode_tail(&data) {
            Ok(x) => x,
            Err(TraceError::BadMagic { .. } | TraceError::Truncated { .. }) => {
                scan_entries(&data, DecodeLimits::default())?
            }
            Err(e) => return Err(e),
        };
        f.set_len(index_offset).map_err(|e| TraceError::io(name.clone(), e))?;
        f.seek(SeekFrom::Start(index_offset)).map_err(|e| TraceError::io(name.clone(), e))?;
        Ok(Writer { inner: BufWriter::new(f), offset: index_offset, entries, name })
    }
}

/// A whole file in memory.
pub fn encode_file(traces: &[RouteTrace]) -> Vec<u8> {
    let mut w = match Writer::new(Vec::new()) {
        Ok(w) => w,
        Err(_) => return Vec::new(), // writing to a Vec cannot fail
    };
    for t in traces {
        let _ = w.push(t);
    }
    w.finish().unwrap_or_default()
}
