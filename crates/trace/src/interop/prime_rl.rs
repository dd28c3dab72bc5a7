//! prime-rl / verifiers: `{"data": base64, "shape": [seq, layers, topk], "start": s,
//! "dtype": "uint8" | "uint16"}` (little-endian), rows for tokens `start..start + seq`.
//!
//! Tokens before `start` (and after the rows, when `num_tokens` says the sequence is longer)
//! import as missing rows. Export writes the contiguous run of present tokens.

use super::{b64_decode, b64_encode, build_trace, export_rows, get_u64, parse_json, Dense, ImportMeta};
use crate::error::{Result, TraceError};
use crate::trace::RouteTrace;
use serde_json::{json, Value};

/// Element type of the `data` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimeDtype {
    U8,
    U16,
}

impl PrimeDtype {
    pub fn name(self) -> &'static str {
        match self {
            PrimeDtype::U8 => "uint8",
            PrimeDtype::U16 => "uint16",
        }
    }
}

/// Imports the payload object (or an object holding it under `routed_experts`).
pub fn from_json(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    let v = parse_json(bytes, "routed_experts")?;
    let p = match v.get("routed_experts") {
        Some(x) if x.is_object() => x,
        _ => &v,
    };
    if !p.is_object() {
        return Err(TraceError::json("routed_experts", "expected an object {data, shape, start, dtype}"));
    }
    let dtype = match p.get("dtype").and_then(Value::as_str) {
        Some("uint8") => PrimeDtype::U8,
        Some("uint16") => PrimeDtype::U16,
        Some(other) => return Err(TraceError::json("dtype", format!("{other:?} is not uint8 or uint16"))),
        None => return Err(TraceError::json("dtype", "missing (uint8 or uint16)")),
    };
    let shape: Vec<usize> = match p.get("shape").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| TraceError::json("shape", "expected non-negative integers"))?,
        None => return Err(TraceError::json("shape", "missing [seq, layers, topk]")),
    };
    if shape.len() != 3 {
        return Err(TraceError::shape("shape", shape, "[seq, layers, topk]"));
    }
    let start = get_u64(p, "start", "")?.unwrap_or(0) as usize;
    let data_s = match p.get("data") {
        Some(Value::String(s)) => s,
        _ => return Err(TraceError::json("data", "missing base64 string")),
    };
    let raw = b64_decode(data_s, "data")?;
    let sz = if dtype == PrimeDtype::U8 { 1 } else { 2 };
    let want = shape.iter().try_fold(sz, |a: usize, &d| a.checked_mul(d));
    if want != Some(raw.len()) {
        return Err(TraceError::shape("shape", shape, format!("{} data bytes of {}", raw.len(), dtype.name())));
    }
    let data: Vec<u16> = if sz == 1 {
        raw.iter().map(|&b| b as u16).collect()
    } else {
        raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    };
    let end = start.checked_add(shape[0]).ok_or_else(|| TraceError::json("start", "overflow"))?;
    let n = meta.num_tokens.unwrap_or(end);
    build_trace(
        Dense { data: &data, rows: shape[0], cols: shape[1], k: shape[2] },
        start,
        n,
        meta.prompt_len.unwrap_or(0),
        meta,
        "data",
    )
}

/// The payload for the present tokens (which must be contiguous). `dtype` `None` picks
/// uint8 when every expert id fits, else uint16.
pub fn to_json(t: &RouteTrace, dtype: Option<PrimeDtype>) -> Result<Value> {
    let first = t.missing().iter().position(|&m| !m).unwrap_or(0);
    let end = t.missing().iter().rposition(|&m| !m).map(|x| x + 1).unwrap_or(0);
    let count = end.saturating_sub(first);
    let data = export_rows(t, first, count, "a prime-rl payload")?;
    let e = t.meta().num_experts;
    let dtype = dtype.unwrap_or(if e <= 256 { PrimeDtype::U8 } else { PrimeDtype::U16 });
    if dtype == PrimeDtype::U8 && e > 256 {
        return Err(TraceError::invalid("dtype", format!("uint8 cannot hold ids of {e} experts")));
    }
    let mut raw = Vec::with_capacity(data.len() * 2);
    for x in data {
        match dtype {
            PrimeDtype::U8 => raw.push(x as u8),
            PrimeDtype::U16 => raw.extend_from_slice(&(x as u16).to_le_bytes()),
        }
    }
    Ok(json!({
        "data": b64_encode(&raw),
        "dtype": dtype.name(),
        "shape": [count, t.num_layers(), t.top_k().unwrap_or(0)],
        "start": first,
    }))
}
