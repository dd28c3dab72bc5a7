//! SGLang: a `/generate` response's `meta_info.routed_experts`, base64 of a flattened
//! little-endian int32 array `[rows, num_hidden_layers, num_experts_per_tok]`
//! (`python/sglang/srt/layers/moe/routed_experts_capturer.py`: one column per decoder layer,
//! dense layers left zero), covering tokens `[routed_experts_start_len, seqlen - 1)`
//! (`python/sglang/srt/managers/io_struct.py`).
//!
//! The payload has no shape. The columns and top-k come from [`ImportMeta`] (a model config
//! gives both); with `seqlen` (`meta_info.prompt_tokens + completion_tokens`) one of them
//! derives the other. Neither known: refused (pass `--model-config`). Tokens before the start
//! and the last one import as missing rows. Exports write the rows `[start, N - 1)`, every
//! decoder layer, and `routed_experts_start_len` when the start is not 0; a present last row
//! cannot be expressed and is dropped ([`Written::last_dropped`]).

use super::{
    b64_decode, b64_encode, build_trace, export_rows, get_u64, n_minus_one_rows, parse_json, Dense, ExportMeta,
};
use super::{ImportMeta, Unknown, Written};
use crate::error::{Result, TraceError};
use crate::trace::RouteTrace;
use serde_json::{json, Value};

const FIELD: &str = "meta_info.routed_experts";

/// Imports an SGLang response (`{"meta_info": {...}}`, also a list of them: the choice
/// [`ImportMeta::choice`]) or its bare `meta_info` object.
pub fn from_json(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    let v = parse_json(bytes, "meta_info")?;
    let v = match &v {
        Value::Array(a) => a.get(meta.choice).ok_or_else(|| {
            TraceError::json(format!("[{}]", meta.choice), format!("missing ({} responses)", a.len()))
        })?,
        v => v,
    };
    let mi = v.get("meta_info").unwrap_or(v);
    if !mi.is_object() {
        return Err(TraceError::json("meta_info", "expected an object"));
    }
    let s = match mi.get("routed_experts") {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => {
            return Err(TraceError::json(
                FIELD,
                "missing (request with return_routed_experts: true, server with --enable-return-routed-experts)",
            ))
        }
        Some(_) => return Err(TraceError::json(FIELD, "expected a base64 string")),
    };
    let raw = b64_decode(s, FIELD)?;
    if raw.len() % 4 != 0 {
        return Err(TraceError::shape(FIELD, vec![raw.len()], "a whole number of int32 values (bytes % 4 == 0)"));
    }
    let data: Vec<i32> = raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let prompt = get_u64(mi, "prompt_tokens", "meta_info")?;
    let completion = get_u64(mi, "completion_tokens", "meta_info")?;
    let start = match get_u64(mi, "routed_experts_start_len", "meta_info")? {
        Some(s) => s as usize,
        None => meta.start.unwrap_or(0),
    };
    let seqlen = match (prompt, completion) {
        (Some(p), Some(c)) => {
            let n = p.checked_add(c).ok_or_else(|| TraceError::json("meta_info.prompt_tokens", "overflow"))? as usize;
            if meta.num_tokens.is_some_and(|x| x != n) {
                return Err(TraceError::invalid("num_tokens", format!("the response holds {n} tokens")));
            }
            Some(n)
        }
        _ => meta.num_tokens,
    };
    if let Some(n) = seqlen {
        if start >= n.max(1) {
            return Err(TraceError::invalid("meta_info.routed_experts_start_len", format!("{start} >= seqlen {n}")));
        }
    }
    let rows_known = seqlen.map(|n| n - 1 - start);
    let k = meta.top_k.map(|k| k as usize).filter(|&k| k > 0);
    // columns: the decoder layers, or (a payload of lockstep's compact layout) the MoE layers
    let cols = match (meta.num_hidden_layers, &meta.layers) {
        (Some(n), _) => Some(n as usize),
        (None, Some(l)) if l.iter().enumerate().all(|(i, &x)| i as u32 == x) => Some(l.len()),
        _ => None,
    };
    let (rows, cols, k) = match (rows_known, cols, k) {
        (_, Some(c), Some(k)) if c > 0 => {
            if data.len() % (c * k) != 0 {
                return Err(TraceError::shape(FIELD, vec![data.len()], format!("[rows, {c} layers, top_k {k}]")));
            }
            (data.len() / (c * k), c, k)
        }
        (Some(r), c, k) if r > 0 && data.len() % r == 0 => {
            let per = data.len() / r;
            match (c, k, &meta.layers) {
                (Some(c), _, _) if c > 0 && per % c == 0 => (r, c, per / c),
                (_, Some(k), _) if per % k == 0 => (r, per / k, k),
                _ => {
                    return Err(TraceError::invalid(
                        FIELD,
                        format!("{per} values per row cannot be split into layers x top_k without the model: pass --model-config config.json (or --top-k)"),
                    ))
                }
            }
        }
        (Some(0), _, _) if data.is_empty() => match (cols, k) {
            (Some(c), Some(k)) => (0, c, k),
            _ => (0, meta.layers.as_ref().map_or(0, |l| l.len()), k.unwrap_or(1)),
        },
        _ => {
            return Err(TraceError::invalid(
                FIELD,
                "flattened data of unknown shape: pass --model-config config.json (or --top-k with the layers)",
            ))
        }
    };
    if rows * cols * k != data.len() {
        return Err(TraceError::shape(FIELD, vec![data.len()], format!("[{rows}, {cols}, {k}]")));
    }
    if let Some(r) = rows_known {
        if r != rows {
            return Err(TraceError::shape(
                FIELD,
                vec![rows, cols, k],
                format!("seqlen - 1 - routed_experts_start_len = {r} rows"),
            ));
        }
    }
    let n = seqlen.unwrap_or(start + rows + 1);
    let prompt_len = meta.prompt_len.or(prompt.map(|p| p as u32)).unwrap_or(0);
    let mut m = meta.clone();
    if m.num_hidden_layers.is_some_and(|h| h as usize != cols) {
        m.num_hidden_layers = None; // a compact payload
    }
    build_trace(Dense { data: &data, rows, cols, k }, start, n, prompt_len, &m, FIELD, Unknown::MinusOne)
}

/// `{"meta_info": {"prompt_tokens", "completion_tokens", "routed_experts"[,
/// "routed_experts_start_len"]}}` for the rows `[start, N - 1)`, every decoder layer.
pub fn to_json(t: &RouteTrace, ex: &ExportMeta) -> Result<(Value, Written)> {
    let (start, rows, last_dropped) = n_minus_one_rows(t, false, "SGLang routed_experts")?;
    let cols = ex.columns(t)?;
    let data = export_rows(t, start, rows, &cols, None, "SGLang routed_experts")?;
    let mut raw = Vec::with_capacity(data.len() * 4);
    for x in data {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    let p = t.meta().prompt_len as u64;
    let n = t.num_tokens() as u64;
    let mut mi = json!({
        "prompt_tokens": p,
        "completion_tokens": n - p,
        "routed_experts": b64_encode(&raw),
    });
    if start > 0 {
        mi["routed_experts_start_len"] = json!(start);
    }
    Ok((json!({ "meta_info": mi }), Written { start, rows, last_dropped }))
}
