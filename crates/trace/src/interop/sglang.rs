//! SGLang: `meta_info.routed_experts`, base64 of a flattened little-endian int32 array of shape
//! `[seqlen - 1, moe_layers, top_k]`.
//!
//! The payload has no shape: `top_k` and the layers come from [`ImportMeta`] (or are derived
//! from `meta_info.prompt_tokens + completion_tokens` when one of them is known). The last
//! token's row is absent by convention and imports as an explicit missing row. Exports write
//! rows `0..N-1`; a present last row cannot be expressed and is dropped (see
//! [`to_json`]'s return value).

use super::{b64_decode, b64_encode, build_trace, export_rows, get_u64, parse_json, Dense, ImportMeta};
use crate::error::{Result, TraceError};
use crate::trace::RouteTrace;
use serde_json::{json, Value};

const FIELD: &str = "meta_info.routed_experts";

/// Imports an SGLang response (`{"meta_info": {...}}`) or its bare `meta_info` object.
pub fn from_json(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    let v = parse_json(bytes, "meta_info")?;
    let mi = v.get("meta_info").unwrap_or(&v);
    if !mi.is_object() {
        return Err(TraceError::json("meta_info", "expected an object"));
    }
    let s = match mi.get("routed_experts") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(TraceError::json(FIELD, "expected a base64 string")),
        None => return Err(TraceError::json(FIELD, "missing")),
    };
    let raw = b64_decode(s, FIELD)?;
    if raw.len() % 4 != 0 {
        return Err(TraceError::shape(FIELD, vec![raw.len()], "a whole number of int32 values (bytes % 4 == 0)"));
    }
    let data: Vec<i32> = raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let prompt = get_u64(mi, "prompt_tokens", "meta_info")?;
    let completion = get_u64(mi, "completion_tokens", "meta_info")?;
    let seqlen = match (prompt, completion, meta.num_tokens) {
        (Some(p), Some(c), _) => {
            Some(p.checked_add(c).ok_or_else(|| TraceError::json("meta_info.prompt_tokens", "overflow"))? as usize)
        }
        (_, _, n) => n,
    };
    let cols = meta.layers.as_ref().map(|l| l.len());
    let (rows, cols, k) = match (seqlen, cols, meta.top_k.map(|k| k as usize)) {
        (_, Some(l), Some(k)) if l > 0 && k > 0 => {
            if data.len() % (l * k) != 0 {
                return Err(TraceError::shape(FIELD, vec![data.len()], format!("[rows, {l} layers, top_k {k}]")));
            }
            (data.len() / (l * k), l, k)
        }
        (Some(n), l, k) if n >= 1 => {
            let rows = n - 1;
            let per = data.len().checked_div(rows).unwrap_or(0);
            match (l, k) {
                (Some(l), _) if l > 0 && rows > 0 && per % l == 0 => (rows, l, per / l),
                (_, Some(k)) if k > 0 && rows > 0 && per % k == 0 => (rows, per / k, k),
                _ => {
                    return Err(TraceError::shape(
                        FIELD,
                        vec![data.len()],
                        format!("[{rows} rows, layers, top_k] (pass layers / top_k)"),
                    ))
                }
            }
        }
        _ => return Err(TraceError::invalid(FIELD, "shape unknown: pass top_k and the MoE layers")),
    };
    if rows * cols * k != data.len() {
        return Err(TraceError::shape(FIELD, vec![data.len()], format!("[{rows}, {cols}, {k}]")));
    }
    let n = match seqlen {
        Some(n) if n != rows + 1 => {
            return Err(TraceError::shape(
                FIELD,
                vec![rows, cols, k],
                format!("seqlen - 1 = {} rows", n.saturating_sub(1)),
            ))
        }
        _ => rows + 1,
    };
    let prompt_len = meta.prompt_len.or(prompt.map(|p| p as u32)).unwrap_or(0);
    let mut m = meta.clone();
    if m.layers.as_ref().is_some_and(|l| l.len() != cols) {
        m.layers = None;
    }
    build_trace(Dense { data: &data, rows, cols, k }, 0, n, prompt_len, &m, FIELD)
}

/// `{"meta_info": {"completion_tokens", "prompt_tokens", "routed_experts"}}` for rows `0..N-1`.
/// Returns the payload and whether a present last row had to be dropped (SGLang's shape has
/// no last row). Fails on a missing row before the last.
pub fn to_json(t: &RouteTrace) -> Result<(Value, bool)> {
    let n = t.num_tokens();
    if n == 0 {
        return Err(TraceError::invalid("num_tokens", "SGLang payloads need at least one token"));
    }
    let data = export_rows(t, 0, n - 1, "SGLang routed_experts")?;
    let mut raw = Vec::with_capacity(data.len() * 4);
    for x in data {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    let p = t.meta().prompt_len as u64;
    let v = json!({"meta_info": {
        "prompt_tokens": p,
        "completion_tokens": n as u64 - p,
        "routed_experts": b64_encode(&raw),
    }});
    Ok((v, !t.is_missing(n - 1)))
}
