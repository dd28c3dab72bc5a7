//! Conversions between [`RouteTrace`] and the route payloads of other systems.
//!
//! Foreign payloads carry ids in selection order, so imports are `ordered` by default and a
//! round trip foreign → lockstep (file) → foreign is bitwise. Rows a foreign engine did not
//! provide (vLLM / SGLang return `N - 1` rows for `N` tokens; prime-rl starts at `start`)
//! become explicit missing rows, never zero-filled ones.

pub mod prime_rl;
pub mod sglang;
pub mod vllm;

use crate::error::{Result, TraceError};
use crate::trace::{RouteTrace, TraceMeta, MAX_EXPERTS};

/// What a foreign payload does not say about itself.
#[derive(Debug, Clone)]
pub struct ImportMeta {
    /// Experts per layer; `None` infers `max id + 1` (a lower bound: pass it when known).
    pub num_experts: Option<u32>,
    /// Decoder-layer ids of the MoE layers (default `0..layers in payload`). If the payload has
    /// more layer columns than this list (dense layers zero-filled), the columns are taken as
    /// decoder layers `0..columns` and the ones not listed are dropped; they must be all zero.
    pub layers: Option<Vec<u32>>,
    /// Experts per token and layer (needed where the payload has no shape, i.e. SGLang).
    pub top_k: Option<u32>,
    /// Tokens in the sequence; default: the format's convention (rows + 1 for vLLM / SGLang).
    pub num_tokens: Option<usize>,
    /// Prompt length (default 0, or what the payload says).
    pub prompt_len: Option<u32>,
    pub fingerprint: u64,
    pub policy_version: u64,
    /// Keep within-row order (default true; foreign payloads are in selection order).
    pub ordered: bool,
    /// Refuse payloads that would expand to more than this many ids (`tokens x layers x k`).
    pub max_ids: u64,
}

impl Default for ImportMeta {
    fn default() -> Self {
        ImportMeta {
            num_experts: None,
            layers: None,
            top_k: None,
            num_tokens: None,
            prompt_len: None,
            fingerprint: 0,
            policy_version: 0,
            ordered: true,
            max_ids: 1 << 31,
        }
    }
}

/// Builds a fixed top-k trace from a dense `[rows][cols][k]` block whose row `i` is token
/// `first + i`; all other tokens of `0..num_tokens` are missing.
/// A dense `[rows][cols][k]` block of ids as parsed from a payload.
pub(crate) struct Dense<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) k: usize,
}

pub(crate) fn build_trace<T: Copy + Into<i64>>(
    dense: Dense<'_, T>,
    first: usize,
    num_tokens: usize,
    prompt_len: u32,
    meta: &ImportMeta,
    field: &str,
) -> Result<RouteTrace> {
    let Dense { data, rows, cols, k } = dense;
    if rows.checked_mul(cols).and_then(|x| x.checked_mul(k)) != Some(data.len()) {
        return Err(TraceError::shape(field, vec![rows, cols, k], format!("{} values", data.len())));
    }
    if first.checked_add(rows).is_none_or(|end| end > num_tokens) {
        return Err(TraceError::shape(
            field,
            vec![rows, cols, k],
            format!("{num_tokens} tokens (rows start at token {first})"),
        ));
    }
    if k == 0 {
        return Err(TraceError::shape(field, vec![rows, cols, k], "top_k >= 1"));
    }
    // bound the per-token row as well as the whole: a payload with no rows may still claim huge layers x k
    let per_token = (cols.max(1) as u64).checked_mul(k as u64);
    let cells = per_token.and_then(|x| x.checked_mul(num_tokens.max(1) as u64));
    if cells.is_none_or(|c| c > meta.max_ids) || cols > u32::MAX as usize {
        return Err(TraceError::invalid(
            "num_tokens",
            format!("{num_tokens} tokens x {cols} layers x {k} exceeds the limit of {} ids", meta.max_ids),
        ));
    }
    // which columns are MoE layers
    let (layers, keep): (Vec<u32>, Vec<usize>) = match &meta.layers {
        None => ((0..cols as u32).collect(), (0..cols).collect()),
        Some(l) if l.len() == cols => (l.clone(), (0..cols).collect()),
        Some(l) if l.len() < cols => {
            if let Some(&bad) = l.iter().find(|&&x| x as usize >= cols) {
                return Err(TraceError::invalid("layers", format!("MoE layer {bad} beyond the {cols} layer columns")));
            }
            (l.clone(), l.iter().map(|&x| x as usize).collect())
        }
        Some(l) => {
            return Err(TraceError::shape(
                field,
                vec![rows, cols, k],
                format!("{} MoE layers given (payload has fewer layer columns)", l.len()),
            ))
        }
    };
    if keep.len() != cols {
        for r in 0..rows {
            for c in (0..cols).filter(|c| !keep.contains(c)) {
                let row = &data[(r * cols + c) * k..(r * cols + c + 1) * k];
                if row.iter().any(|&x| x.into() != 0) {
                    return Err(TraceError::invalid(
                        format!("{field}[{r}][{c}]"),
                        "dense layer column (not in layers) has nonzero ids",
                    ));
                }
            }
        }
    }
    let mut max_id = -1i64;
    for (i, &x) in data.iter().enumerate() {
        let x: i64 = x.into();
        let c = (i / k) % cols;
        if keep.len() != cols && !keep.contains(&c) {
            continue;
        }
        if x < 0 || x >= meta.num_experts.unwrap_or(MAX_EXPERTS) as i64 {
            return Err(TraceError::ExpertOutOfRange {
                field: format!("{field}[{}][{c}][{}]", i / (k * cols), i % k),
                id: x,
                num_experts: meta.num_experts.unwrap_or(MAX_EXPERTS),
            });
        }
        max_id = max_id.max(x);
    }
    let num_experts = meta.num_experts.unwrap_or((max_id + 1).max(k as i64) as u32);
    let nl = keep.len();
    let mut ids = vec![crate::MISSING_ID; num_tokens * nl * k];
    for r in 0..rows {
        for (j, &c) in keep.iter().enumerate() {
            let src = &data[(r * cols + c) * k..(r * cols + c + 1) * k];
            let dst = &mut ids[((first + r) * nl + j) * k..((first + r) * nl + j + 1) * k];
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s.into() as u16;
            }
        }
    }
    let missing = (0..num_tokens).map(|t| t < first || t >= first + rows).collect();
    let tm = TraceMeta {
        num_experts,
        top_k: k as u32,
        prompt_len,
        fingerprint: meta.fingerprint,
        policy_version: meta.policy_version,
        ordered: meta.ordered,
    };
    RouteTrace::new(tm, layers, num_tokens, ids, missing, None).map_err(|e| match e {
        TraceError::Invalid { field: f, msg } => TraceError::Invalid { field: format!("{field}: {f}"), msg },
        other => other,
    })
}

/// Rows `first..first + count` of a fixed top-k trace as `[count][layers][k]` values;
/// every one of those tokens must be present.
pub(crate) fn export_rows(t: &RouteTrace, first: usize, count: usize, format: &str) -> Result<Vec<i32>> {
    let k = t.top_k().ok_or_else(|| {
        TraceError::invalid("top_k", format!("variable-count (expert-choice) rows cannot be written as {format}"))
    })?;
    let nl = t.num_layers();
    let mut out = Vec::with_capacity(count * nl * k);
    for tok in first..first + count {
        if t.is_missing(tok) {
            return Err(TraceError::invalid(
                format!("missing[{tok}]"),
                format!("token {tok} has no routes and {format} cannot mark a missing row there"),
            ));
        }
        out.extend(t.ids()[tok * nl * k..(tok + 1) * nl * k].iter().map(|&x| x as i32));
    }
    Ok(out)
}

/// Standard base64 (with padding), the encoding SGLang and prime-rl use.
pub(crate) fn b64_decode(s: &str, field: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.as_bytes())
        .map_err(|e| TraceError::Base64 { field: field.into(), msg: e.to_string() })
}

pub(crate) fn b64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Parses JSON text, naming `field` on failure.
pub(crate) fn parse_json(bytes: &[u8], field: &str) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|e| TraceError::json(field, e.to_string()))
}

pub(crate) fn get_u64(v: &serde_json::Value, key: &str, field: &str) -> Result<Option<u64>> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| TraceError::json(format!("{field}.{key}"), "expected a non-negative integer")),
    }
}
