//! Little-endian cursor reading with named-field errors (never panics on short input).

use crate::error::{Result, TraceError};

/// A bounds-checked little-endian reader over a byte slice.
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    /// Prefix for field names in errors, e.g. `block[2]`.
    ctx: String,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8], ctx: impl Into<String>) -> Self {
        Cursor { data, pos: 0, ctx: ctx.into() }
    }
    pub(crate) fn field(&self, name: &str) -> String {
        if self.ctx.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.ctx)
        }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    pub(crate) fn take(&mut self, n: usize, name: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(TraceError::Truncated {
                field: self.field(name),
                need: n as u64,
                have: self.remaining() as u64,
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn u8(&mut self, name: &str) -> Result<u8> {
        Ok(self.take(1, name)?[0])
    }
    pub(crate) fn u32(&mut self, name: &str) -> Result<u32> {
        let b = self.take(4, name)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self, name: &str) -> Result<u64> {
        let b = self.take(8, name)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A u64 length that must fit in the remaining input.
    pub(crate) fn len_u64(&mut self, name: &str) -> Result<usize> {
        let v = self.u64(name)?;
        if v > self.remaining() as u64 {
            return Err(TraceError::Truncated { field: self.field(name), need: v, have: self.remaining() as u64 });
        }
        Ok(v as usize)
    }
    pub(crate) fn finish(&self, name: &str) -> Result<()> {
        if self.remaining() != 0 {
            return Err(TraceError::invalid(
                self.field(name),
                format!("{} unexpected trailing bytes", self.remaining()),
            ));
        }
        Ok(())
    }
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
