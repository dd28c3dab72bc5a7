//! prime-rl / verifiers, in its two forms.
//!
//! * **Inference payload** (`src/prime_rl/inference/vllm/routed_experts.py`,
//!   `serialize_routed_experts`): `{"data": base64, "shape": [rows, num_hidden_layers, topk],
//!   "start": s, "dtype": "uint8" | "uint16"}` (little-endian), vLLM's routed experts from the
//!   request's `routed_experts_prompt_start` = `start` on: tokens `[start, N - 1)`. Alone, or
//!   in a whole `/inference/v1/generate` response (`serving_tokens.py`: `choices[i]
//!   .routed_experts`, `choices[i].token_ids`, `usage.prompt_tokens`, which fix `N`).
//! * **Trainer transport** (`src/prime_rl/transports/rollouts/types.py`): msgpack of
//!   `RoutedExperts{data: bytes, shape: [seq_len, layers, topk], dtype}` (a msgspec
//!   `array_like` struct: a 3-element array), all `N` tokens; `orchestrator/trajectories.py`
//!   zero-pads the rows it had no routes for (the last). With top-k >= 2 a zero row is not a
//!   route and imports as missing; with top-1 a zero last row is refused (pass `num_tokens` to
//!   keep it as expert 0).

use super::nested::Routes;
use super::{b64_decode, b64_encode, build_trace, export_rows, n_minus_one_rows, tokens_n_minus_one, Dense};
use super::{ExportMeta, ImportMeta, Unknown, Written};
use crate::error::{Result, TraceError};
use crate::trace::RouteTrace;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Element type of the `data` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimeDtype {
    U8,
    U16,
    I16,
    I32,
    I64,
}

impl PrimeDtype {
    pub fn name(self) -> &'static str {
        match self {
            PrimeDtype::U8 => "uint8",
            PrimeDtype::U16 => "uint16",
            PrimeDtype::I16 => "int16",
            PrimeDtype::I32 => "int32",
            PrimeDtype::I64 => "int64",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "uint8" => PrimeDtype::U8,
            "uint16" => PrimeDtype::U16,
            "int16" => PrimeDtype::I16,
            "int32" => PrimeDtype::I32,
            "int64" => PrimeDtype::I64,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            PrimeDtype::U8 => 1,
            PrimeDtype::U16 | PrimeDtype::I16 => 2,
            PrimeDtype::I32 => 4,
            PrimeDtype::I64 => 8,
        }
    }
    /// What `serialize_routed_experts` picks: uint8 while ids fit, else uint16.
    pub fn for_experts(num_experts: u32) -> Self {
        if num_experts <= 256 {
            PrimeDtype::U8
        } else {
            PrimeDtype::U16
        }
    }
}

fn decode_values(raw: &[u8], dtype: PrimeDtype, field: &str) -> Result<Vec<i64>> {
    let sz = dtype.size();
    if raw.len() % sz != 0 {
        return Err(TraceError::shape(field, vec![raw.len()], format!("whole {} values", dtype.name())));
    }
    Ok(raw
        .chunks_exact(sz)
        .map(|c| match dtype {
            PrimeDtype::U8 => c[0] as i64,
            PrimeDtype::U16 => u16::from_le_bytes([c[0], c[1]]) as i64,
            PrimeDtype::I16 => i16::from_le_bytes([c[0], c[1]]) as i64,
            PrimeDtype::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
            PrimeDtype::I64 => i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

fn encode_values(data: &[i32], dtype: PrimeDtype, e: u32) -> Result<Vec<u8>> {
    if (dtype == PrimeDtype::U8 && e > 256) || (dtype == PrimeDtype::I16 && e > 32768) {
        return Err(TraceError::invalid("dtype", format!("{} cannot hold ids of {e} experts", dtype.name())));
    }
    let mut raw = Vec::with_capacity(data.len() * dtype.size());
    for &x in data {
        match dtype {
            PrimeDtype::U8 => raw.push(x as u8),
            PrimeDtype::U16 => raw.extend_from_slice(&(x as u16).to_le_bytes()),
            PrimeDtype::I16 => raw.extend_from_slice(&(x as i16).to_le_bytes()),
            PrimeDtype::I32 => raw.extend_from_slice(&x.to_le_bytes()),
            PrimeDtype::I64 => raw.extend_from_slice(&(x as i64).to_le_bytes()),
        }
    }
    Ok(raw)
}

fn shape3(v: Option<&Value>, field: &str) -> Result<[usize; 3]> {
    let a = v.and_then(Value::as_array).ok_or_else(|| TraceError::json(field, "missing [seq, layers, topk]"))?;
    let s: Vec<usize> = a
        .iter()
        .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| TraceError::json(field, "expected non-negative integers"))?;
    match s[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(TraceError::shape(field, s, "[seq, layers, topk]")),
    }
}

fn payload_trace(p: &Map<String, Value>, meta: &ImportMeta, prefix: &str) -> Result<RouteTrace> {
    let f = |k: &str| format!("{prefix}{k}");
    let dtype = match p.get("dtype").and_then(Value::as_str) {
        Some("uint8") => PrimeDtype::U8,
        Some("uint16") => PrimeDtype::U16,
        Some(other) => return Err(TraceError::json(f("dtype"), format!("{other:?} is not uint8 or uint16"))),
        None => return Err(TraceError::json(f("dtype"), "missing (uint8 or uint16)")),
    };
    let shape = shape3(p.get("shape"), &f("shape"))?;
    let start = match p.get("start") {
        None | Some(Value::Null) => meta.start.unwrap_or(0),
        Some(x) => x.as_u64().ok_or_else(|| TraceError::json(f("start"), "expected a non-negative integer"))? as usize,
    };
    let data_s = match p.get("data") {
        Some(Value::String(s)) => s,
        _ => return Err(TraceError::json(f("data"), "missing base64 string")),
    };
    let raw = b64_decode(data_s, &f("data"))?;
    let want = shape.iter().try_fold(dtype.size(), |a: usize, &d| a.checked_mul(d));
    if want != Some(raw.len()) {
        return Err(TraceError::shape(
            f("shape"),
            shape.to_vec(),
            format!("{} data bytes of {}", raw.len(), dtype.name()),
        ));
    }
    let data = decode_values(&raw, dtype, &f("data"))?;
    let n = tokens_n_minus_one(start, shape[0], meta, &f("data"), &shape)?;
    let d = Dense { data: &data, rows: shape[0], cols: shape[1], k: shape[2] };
    build_trace(d, start, n, meta.prompt_len.unwrap_or(0), meta, &f("data"), Unknown::MinusOne)
}

#[derive(Deserialize)]
struct GenChoice {
    routed_experts: Option<Routes>,
    token_ids: Option<Vec<u64>>,
}

#[derive(Deserialize)]
struct GenUsage {
    prompt_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct GenBody {
    choices: Vec<GenChoice>,
    usage: Option<GenUsage>,
}

/// Imports the payload object, an object holding it under `routed_experts`, or a whole
/// `/inference/v1/generate` response (choice [`ImportMeta::choice`]; `N` = `usage.prompt_tokens`
/// + the choice's `token_ids`).
pub fn from_json(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| TraceError::json("routed_experts", e.to_string()))?;
    if v.get("choices").is_some() {
        let b: GenBody = serde_json::from_value(v).map_err(|e| TraceError::json("choices", e.to_string()))?;
        let i = meta.choice;
        let n = b.choices.len();
        let c = b
            .choices
            .into_iter()
            .nth(i)
            .ok_or_else(|| TraceError::json(format!("choices[{i}]"), format!("missing ({n} choices)")))?;
        let field = format!("choices[{i}].routed_experts");
        let p = match c.routed_experts {
            Some(Routes::Object(p)) => p,
            Some(_) => return Err(TraceError::json(&field, "expected prime-rl's {data, shape, start, dtype} object")),
            None => return Err(TraceError::json(&field, "missing (server without --enable-return-routed-experts?)")),
        };
        let mut m = meta.clone();
        let prompt = b.usage.and_then(|u| u.prompt_tokens);
        if let (Some(p), Some(t)) = (prompt, &c.token_ids) {
            let total = p as usize + t.len();
            if m.num_tokens.is_some_and(|x| x != total) {
                return Err(TraceError::invalid("num_tokens", format!("the response holds {total} tokens")));
            }
            m.num_tokens = Some(total);
        }
        if m.prompt_len.is_none() {
            m.prompt_len = prompt.map(|p| p as u32);
        }
        return payload_trace(&p, &m, &format!("{field}."));
    }
    let p = match v.get("routed_experts") {
        Some(Value::Object(x)) => x,
        _ => v
            .as_object()
            .ok_or_else(|| TraceError::json("routed_experts", "expected an object {data, shape, start, dtype}"))?,
    };
    payload_trace(p, meta, "")
}

/// The inference payload for the rows `[start, N - 1)` (`start` the first present token).
/// `dtype` `None`: [`PrimeDtype::for_experts`]; only uint8 / uint16 are written.
pub fn to_json(t: &RouteTrace, dtype: Option<PrimeDtype>, ex: &ExportMeta) -> Result<(Value, Written)> {
    let (start, rows, last_dropped) = n_minus_one_rows(t, false, "a prime-rl payload")?;
    let cols = ex.columns(t)?;
    let data = export_rows(t, start, rows, &cols, None, "a prime-rl payload")?;
    let e = t.meta().num_experts;
    let dtype = dtype.unwrap_or(PrimeDtype::for_experts(e));
    if !matches!(dtype, PrimeDtype::U8 | PrimeDtype::U16) {
        return Err(TraceError::invalid("dtype", "prime-rl payloads are uint8 or uint16"));
    }
    let raw = encode_values(&data, dtype, e)?;
    let v = json!({
        "data": b64_encode(&raw),
        "dtype": dtype.name(),
        "shape": [rows, cols.len(), t.top_k().unwrap_or(0)],
        "start": start,
    });
    Ok((v, Written { start, rows, last_dropped }))
}

/// prime-rl's `RoutedExperts` transport struct (msgspec `array_like`: `[data, shape, dtype]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedExperts {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub shape: Vec<usize>,
    pub dtype: String,
}

const TFIELD: &str = "routed_experts";

/// Imports msgpack bytes of a `RoutedExperts` (array or map encoding): rows = all `N` tokens.
pub fn from_msgpack(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    let r: RoutedExperts =
        rmp_serde::from_slice(bytes).map_err(|e| TraceError::json(TFIELD, format!("msgpack: {e}")))?;
    from_transport(&r, meta)
}

/// Imports a decoded `RoutedExperts`.
pub fn from_transport(r: &RoutedExperts, meta: &ImportMeta) -> Result<RouteTrace> {
    let shape: [usize; 3] = match r.shape[..] {
        [a, b, c] => [a, b, c],
        _ => return Err(TraceError::shape(format!("{TFIELD}.shape"), r.shape.clone(), "[seq_len, layers, topk]")),
    };
    let dtype = PrimeDtype::parse(&r.dtype)
        .ok_or_else(|| TraceError::json(format!("{TFIELD}.dtype"), format!("{:?} is not an integer dtype", r.dtype)))?;
    let want = shape.iter().try_fold(dtype.size(), |a: usize, &d| a.checked_mul(d));
    if want != Some(r.data.len()) {
        return Err(TraceError::shape(
            format!("{TFIELD}.shape"),
            shape.to_vec(),
            format!("{} data bytes of {}", r.data.len(), dtype.name()),
        ));
    }
    let data = decode_values(&r.data, dtype, &format!("{TFIELD}.data"))?;
    let (rows, cols, k) = (shape[0], shape[1], shape[2]);
    let n = match meta.num_tokens {
        None => rows,
        Some(n) if n == rows => n,
        Some(n) => {
            return Err(TraceError::shape(
                format!("{TFIELD}.shape"),
                shape.to_vec(),
                format!("{n} tokens (the transport has a row per token)"),
            ))
        }
    };
    if k == 1 && meta.num_tokens.is_none() && rows > 0 && data[(rows - 1) * cols..].iter().all(|&x| x == 0) && cols > 0
    {
        return Err(TraceError::invalid(
            format!("{TFIELD}.data[{}]", rows - 1),
            "the last row is all zeros: with top-1, prime-rl's zero padding (orchestrator/trajectories.py) cannot be told \
             from routing to expert 0; pass num_tokens (--num-tokens) to keep it as expert 0",
        ));
    }
    let d = Dense { data: &data, rows, cols, k };
    build_trace(d, 0, n, meta.prompt_len.unwrap_or(0), meta, &format!("{TFIELD}.data"), Unknown::MinusOneOrZero)
}

/// The transport struct: a row per token, missing tokens zero-filled (as prime-rl pads), every
/// decoder layer. Zero rows only read back as missing with top-k >= 2, so top-1 traces with a
/// missing row are refused. `dtype` `None`: [`PrimeDtype::for_experts`].
pub fn to_transport(t: &RouteTrace, dtype: Option<PrimeDtype>, ex: &ExportMeta) -> Result<RoutedExperts> {
    let k = t.top_k().unwrap_or(0);
    if k == 1 {
        if let Some(p) = t.missing().iter().position(|&m| m) {
            return Err(TraceError::invalid(
                format!("missing[{p}]"),
                "with top-1 a zero-filled row would read back as expert 0; the transport cannot mark it",
            ));
        }
    }
    let cols = ex.columns(t)?;
    let n = t.num_tokens();
    let data = export_rows(t, 0, n, &cols, Some(0), "the prime-rl transport")?;
    let e = t.meta().num_experts;
    let dtype = dtype.unwrap_or(PrimeDtype::for_experts(e));
    Ok(RoutedExperts {
        data: encode_values(&data, dtype, e)?,
        shape: vec![n, cols.len(), k],
        dtype: dtype.name().into(),
    })
}

/// msgpack bytes of [`to_transport`] (the `array_like` encoding msgspec writes).
pub fn to_msgpack(t: &RouteTrace, dtype: Option<PrimeDtype>, ex: &ExportMeta) -> Result<Vec<u8>> {
    let r = to_transport(t, dtype, ex)?;
    rmp_serde::to_vec(&r).map_err(|e| TraceError::invalid(TFIELD, format!("msgpack: {e}")))
}
