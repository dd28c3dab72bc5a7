//! Minimal `.npy` (v1/v2/v3) reader and writer for integer arrays in C order.
//!
//! Reads `i1 u1 i2 u2 i4 i8` in either byte order (values must fit in i32); writes
//! little-endian with numpy's own header layout (`{'descr': '<i4', 'fortran_order': False,
//! 'shape': (3, 2, 8), }`, space-padded to a 64-byte boundary), so files numpy wrote
//! round-trip bitwise.

use crate::error::{Result, TraceError};

/// Element type of an integer `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    I8,
    U8,
    I16,
    U16,
    I32,
    I64,
}

impl NpyDtype {
    pub fn size(self) -> usize {
        match self {
            NpyDtype::I8 | NpyDtype::U8 => 1,
            NpyDtype::I16 | NpyDtype::U16 => 2,
            NpyDtype::I32 => 4,
            NpyDtype::I64 => 8,
        }
    }
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::I8 => "|i1",
            NpyDtype::U8 => "|u1",
            NpyDtype::I16 => "<i2",
            NpyDtype::U16 => "<u2",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
        }
    }
    fn range(self) -> (i64, i64) {
        match self {
            NpyDtype::I8 => (i8::MIN as i64, i8::MAX as i64),
            NpyDtype::U8 => (0, u8::MAX as i64),
            NpyDtype::I16 => (i16::MIN as i64, i16::MAX as i64),
            NpyDtype::U16 => (0, u16::MAX as i64),
            NpyDtype::I32 | NpyDtype::I64 => (i32::MIN as i64, i32::MAX as i64),
        }
    }
    /// Parses names like `int16`, `i4`, `uint8`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "int8" | "i1" => NpyDtype::I8,
            "uint8" | "u1" => NpyDtype::U8,
            "int16" | "i2" => NpyDtype::I16,
            "uint16" | "u2" => NpyDtype::U16,
            "int32" | "i4" => NpyDtype::I32,
            "int64" | "i8" => NpyDtype::I64,
            _ => return None,
        })
    }
}

/// A C-order integer array (values widened to i32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyArray {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data: Vec<i32>,
}

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Parses a `.npy` file.
pub fn read_npy(bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 {
        return Err(TraceError::Truncated { field: "npy.header".into(), need: 10, have: bytes.len() as u64 });
    }
    if &bytes[..6] != MAGIC {
        return Err(TraceError::BadMagic {
            field: "npy.magic".into(),
            expected: "\\x93NUMPY".into(),
            found: String::from_utf8_lossy(&bytes[..6]).into_owned(),
        });
    }
    let major = bytes[6];
    let (hlen, hstart): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(TraceError::Truncated {
                    field: "npy.header_len".into(),
                    need: 12,
                    have: bytes.len() as u64,
                });
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(TraceError::Version { field: "npy.version".into(), found: v as u32, supported: 1 }),
    };
    let hend = hstart.checked_add(hlen).filter(|&e| e <= bytes.len()).ok_or(TraceError::Truncated {
        field: "npy.header".into(),
        need: (hstart + hlen) as u64,
        have: bytes.len() as u64,
    })?;
    let header = std::str::from_utf8(&bytes[hstart..hend])
        .map_err(|_| TraceError::invalid("npy.header", "not UTF-8 / ASCII"))?;
    let (descr, fortran, shape) = parse_header(header)?;
    if fortran {
        return Err(TraceError::invalid("npy.header.fortran_order", "Fortran-order arrays are not supported"));
    }
    let (big, dtype) = parse_descr(&descr)?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| TraceError::invalid("npy.header.shape", "element count overflows"))?;
    let body = &bytes[hend..];
    let need = count
        .checked_mul(dtype.size())
        .ok_or_else(|| TraceError::invalid("npy.header.shape", "byte size overflows"))?;
    if body.len() != need {
        return Err(TraceError::shape(
            "npy.data",
            shape.clone(),
            format!("{} data bytes present (need {need})", body.len()),
        ));
    }
    let mut data = Vec::with_capacity(count);
    let sz = dtype.size();
    for (i, ch) in body.chunks_exact(sz).enumerate() {
        let mut b = [0u8; 8];
        b[..sz].copy_from_slice(ch);
        if big {
            b[..sz].reverse();
        }
        let v: i64 = match dtype {
            NpyDtype::I8 => b[0] as i8 as i64,
            NpyDtype::U8 => b[0] as i64,
            NpyDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            NpyDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            NpyDtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            NpyDtype::I64 => i64::from_le_bytes(b),
        };
        let v = i32::try_from(v)
            .map_err(|_| TraceError::invalid(format!("npy.data[{i}]"), format!("{v} does not fit in int32")))?;
        data.push(v);
    }
    Ok(NpyArray { dtype, shape, data })
}

fn parse_descr(d: &str) -> Result<(bool, NpyDtype)> {
    let bad = || TraceError::invalid("npy.header.descr", format!("unsupported dtype {d:?} (integer types only)"));
    let big = match d.as_bytes().first() {
        Some(b'<' | b'|' | b'=') => false,
        Some(b'>') => true,
        _ => return Err(bad()),
    };
    let code = d.get(1..).ok_or_else(bad)?;
    let t = NpyDtype::parse(code).ok_or_else(bad)?;
    Ok((big, t))
}

/// Parses numpy's header dict literal: `{'descr': .., 'fortran_order': .., 'shape': (..), }`.
fn parse_header(h: &str) -> Result<(String, bool, Vec<usize>)> {
    let mut p = Lexer { s: h.as_bytes(), i: 0 };
    let err = |what: &str| TraceError::invalid("npy.header", format!("malformed dict: {what}"));
    p.expect(b'{').ok_or_else(|| err("expected '{'"))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| err("expected a quoted key"))?;
        p.expect(b':').ok_or_else(|| err("expected ':'"))?;
        p.ws();
        match key.as_str() {
            "descr" => descr = Some(p.string().ok_or_else(|| err("descr must be a string"))?),
            "fortran_order" => {
                fortran = Some(if p.word("True") {
                    true
                } else if p.word("False") {
                    false
                } else {
                    return Err(TraceError::invalid("npy.header.fortran_order", "must be True or False"));
                })
            }
            "shape" => {
                shape = Some(
                    p.tuple().ok_or_else(|| TraceError::invalid("npy.header.shape", "must be a tuple of integers"))?,
                )
            }
            other => return Err(err(&format!("unknown key {other:?}"))),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}').ok_or_else(|| err("expected ',' or '}'"))?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(err("trailing characters"));
    }
    Ok((
        descr.ok_or_else(|| TraceError::invalid("npy.header.descr", "missing"))?,
        fortran.ok_or_else(|| TraceError::invalid("npy.header.fortran_order", "missing"))?,
        shape.ok_or_else(|| TraceError::invalid("npy.header.shape", "missing"))?,
    ))
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Option<()> {
        self.ws();
        self.eat(c).then_some(())
    }
    fn word(&mut self, w: &str) -> bool {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            true
        } else {
            false
        }
    }
    fn string(&mut self) -> Option<String> {
        let q = *self.s.get(self.i)?;
        if q != b'\'' && q != b'"' {
            return None;
        }
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == q)?;
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }
    fn tuple(&mut self) -> Option<Vec<usize>> {
        if !self.eat(b'(') {
            return None;
        }
        let mut out = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Some(out);
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if start == self.i {
                return None;
            }
            out.push(std::str::from_utf8(&self.s[start..self.i]).ok()?.parse().ok()?);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                return self.eat(b')').then_some(out);
            }
        }
    }
}

/// Serialises `arr` (little-endian, numpy's header layout). Values must fit `arr.dtype`.
pub fn write_npy(arr: &NpyArray) -> Result<Vec<u8>> {
    let count: usize = arr.shape.iter().product();
    if count != arr.data.len() {
        return Err(TraceError::shape("npy.shape", arr.shape.clone(), format!("{} values", arr.data.len())));
    }
    let shape = match arr.shape.len() {
        1 => format!("({},)", arr.shape[0]),
        _ => format!("({})", arr.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", arr.dtype.descr());
    let (v, prefix) = if header.len() + 11 < 65536 { (1u8, 10) } else { (2u8, 12) };
    let total = (prefix + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - prefix - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + count * arr.dtype.size());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[v, 0]);
    if v == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    let (lo, hi) = arr.dtype.range();
    for (i, &x) in arr.data.iter().enumerate() {
        let x = x as i64;
        if x < lo || x > hi {
            return Err(TraceError::invalid(format!("npy.data[{i}]"), format!("{x} does not fit {:?}", arr.dtype)));
        }
        match arr.dtype.size() {
            1 => out.push(x as u8),
            2 => out.extend_from_slice(&(x as u16).to_le_bytes()),
            4 => out.extend_from_slice(&(x as i32).to_le_bytes()),
            _ => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    Ok(out)
}
