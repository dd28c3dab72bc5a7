//! vLLM routed experts, in the two forms vLLM has shipped.
//!
//! * **Current** (`vllm/entrypoints/openai/completion/protocol.py`,
//!   `chat_completion/protocol.py`, the `/inference/v1/generate` choice of
//!   `vllm/entrypoints/serve/disagg/protocol.py`): `choices[i].routed_experts` is a string,
//!   base64 of `np.save` bytes, shape `(num_tokens - 1, num_hidden_layers, num_experts_per_tok)`,
//!   dtype uint8 / uint16 / int32, rows from the request's `routed_experts_prompt_start` on
//!   ([`ImportMeta::start`]). Also read: the `.npy` file itself.
//! * **0.21**: `prompt_routed_experts` at the response level (one row per prompt token) and
//!   `choices[i].routed_experts` (the completion's tokens but the last), nested int16 lists,
//!   `-1` rows for prefix-cached positions (imported as missing, written for missing rows).
//!
//! A whole response (completions: `prompt_token_ids` on the choice; chat: at the top level;
//! generate: `usage.prompt_tokens`) fixes the token count `N` = prompt + `token_ids`, and the
//! rows are checked against it. Columns: every decoder layer ([`super::ExportMeta`]).

use super::nested::{Flat3, Routes};
use super::{
    b64_decode, b64_encode, build_trace, export_rows, n_minus_one_rows, tokens_n_minus_one, Dense, ExportMeta,
    ImportMeta, Unknown, Written,
};
use crate::error::{Result, TraceError};
use crate::npy::{read_npy, write_npy, NpyArray, NpyDtype};
use crate::trace::RouteTrace;
use serde::Deserialize;
use serde_json::Value;

const FIELD: &str = "routed_experts";

fn check3(shape: &[usize], field: &str) -> Result<()> {
    if shape.len() != 3 {
        return Err(TraceError::shape(field, shape.to_vec(), "[tokens, num_hidden_layers, top_k]"));
    }
    Ok(())
}

/// What a whole response says about the sequence around the routes.
#[derive(Debug, Clone, Copy, Default)]
struct Known {
    /// prompt tokens, if the response says
    prompt: Option<usize>,
    /// completion tokens of the choice, if the response says
    completion: Option<usize>,
}

impl Known {
    fn total(&self) -> Option<usize> {
        Some(self.prompt? + self.completion?)
    }
    /// `meta` with `num_tokens` / `prompt_len` filled from the response (a conflict with
    /// values already set is an error).
    fn apply(&self, meta: &ImportMeta) -> Result<ImportMeta> {
        let mut m = meta.clone();
        if let Some(n) = self.total() {
            match m.num_tokens {
                Some(x) if x != n => {
                    return Err(TraceError::invalid("num_tokens", format!("{x}, but the response holds {n} tokens")))
                }
                _ => m.num_tokens = Some(n),
            }
        }
        if m.prompt_len.is_none() {
            m.prompt_len = self.prompt.map(|p| p as u32);
        }
        Ok(m)
    }
}

/// Imports a current-form `routed_experts` array (rows `[start, N - 1)`).
pub fn from_array(arr: &NpyArray, meta: &ImportMeta) -> Result<RouteTrace> {
    check3(&arr.shape, FIELD)?;
    let (r, l, k) = (arr.shape[0], arr.shape[1], arr.shape[2]);
    let start = meta.start.unwrap_or(0);
    let n = tokens_n_minus_one(start, r, meta, FIELD, &arr.shape)?;
    let d = Dense { data: &arr.data, rows: r, cols: l, k };
    build_trace(d, start, n, meta.prompt_len.unwrap_or(0), meta, FIELD, Unknown::MinusOne)
}

/// Imports a `.npy` file's bytes (current form).
pub fn from_npy(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    from_array(&read_npy(bytes)?, meta)
}

/// Imports the current form's string: base64 of `.npy` bytes
/// (`np.load(io.BytesIO(base64.b64decode(s)))`).
pub fn from_b64(s: &str, meta: &ImportMeta) -> Result<RouteTrace> {
    let bytes = b64_decode(s.trim(), FIELD)?;
    from_array(&read_npy(&bytes).map_err(|e| prefix(e, FIELD))?, meta)
}

fn prefix(e: TraceError, field: &str) -> TraceError {
    match e {
        TraceError::Invalid { field: f, msg } => TraceError::Invalid { field: format!("{field}: {f}"), msg },
        other => other,
    }
}

/// Imports vLLM 0.21's `prompt_routed_experts` (`[P, L, K]`, one row per prompt token)
/// followed by the choice's `routed_experts` (`[C - 1, L, K]`); `-1` rows are missing.
pub fn from_prompt_and_completion(prompt: &NpyArray, completion: &NpyArray, meta: &ImportMeta) -> Result<RouteTrace> {
    check3(&prompt.shape, "prompt_routed_experts")?;
    check3(&completion.shape, FIELD)?;
    let p = Flat3 {
        shape: [prompt.shape[0], prompt.shape[1], prompt.shape[2]],
        data: prompt.data.iter().map(|&x| x as i64).collect(),
    };
    let c = Flat3 {
        shape: [completion.shape[0], completion.shape[1], completion.shape[2]],
        data: completion.data.iter().map(|&x| x as i64).collect(),
    };
    nested_trace(Some(p), Some(c), meta)
}

fn nested_trace(prompt: Option<Flat3>, comp: Option<Flat3>, meta: &ImportMeta) -> Result<RouteTrace> {
    let (mut data, mut rows, mut shape, mut prompt_len) = (Vec::new(), 0usize, None::<[usize; 3]>, meta.prompt_len);
    for (f, name) in [(prompt, "prompt_routed_experts"), (comp, FIELD)] {
        let Some(f) = f else { continue };
        match shape {
            Some(s) if f.shape[0] > 0 && rows > 0 && s[1..] != f.shape[1..] => {
                return Err(TraceError::shape(name, f.shape.to_vec(), format!("the layers / top_k of {s:?}")))
            }
            Some(_) if f.shape[0] == 0 => {}
            _ => shape = Some(f.shape),
        }
        if name == "prompt_routed_experts" {
            prompt_len = Some(f.shape[0] as u32);
        }
        rows += f.shape[0];
        data.extend(f.data);
    }
    let s = shape.ok_or_else(|| TraceError::json(FIELD, "missing"))?;
    let n = tokens_n_minus_one(0, rows, meta, FIELD, &[rows, s[1], s[2]])?;
    let d = Dense { data: &data, rows, cols: s[1], k: s[2] };
    build_trace(d, 0, n, prompt_len.unwrap_or(0), meta, FIELD, Unknown::MinusOne)
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Choice {
    routed_experts: Option<Routes>,
    prompt_token_ids: Option<Vec<u64>>,
    token_ids: Option<Vec<u64>>,
}

#[derive(Deserialize)]
struct Body {
    choices: Option<Vec<Choice>>,
    routed_experts: Option<Routes>,
    prompt_routed_experts: Option<Routes>,
    prompt_token_ids: Option<Vec<u64>>,
    token_ids: Option<Vec<u64>>,
    usage: Option<Usage>,
}

/// Imports any JSON form: a bare base64 string or nested list; a choice-like object with
/// `routed_experts` (and 0.21's `prompt_routed_experts`); a whole completions / chat /
/// `/inference/v1/generate` response (choice [`ImportMeta::choice`]).
pub fn from_json(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    let text = std::str::from_utf8(bytes).map_err(|_| TraceError::json(FIELD, "not UTF-8"))?;
    let json_err = |e: serde_json::Error| TraceError::json(FIELD, e.to_string());
    let (routes, prompt_routes, known) = match text.trim_start().as_bytes().first() {
        Some(b'[' | b'"') => (Some(serde_json::from_str::<Routes>(text).map_err(json_err)?), None, Known::default()),
        _ => {
            let b: Body = serde_json::from_str(text).map_err(json_err)?;
            let usage_prompt = b.usage.and_then(|u| u.prompt_tokens).map(|p| p as usize);
            match b.choices {
                Some(mut cs) => {
                    let i = meta.choice;
                    if i >= cs.len() {
                        return Err(TraceError::json(
                            format!("choices[{i}]"),
                            format!("missing ({} choices)", cs.len()),
                        ));
                    }
                    let c = cs.swap_remove(i);
                    let prompt = c.prompt_token_ids.or(b.prompt_token_ids).map(|p| p.len()).or(usage_prompt);
                    let known = Known { prompt, completion: c.token_ids.map(|t| t.len()) };
                    if c.routed_experts.is_none() && b.prompt_routed_experts.is_none() {
                        return Err(TraceError::json(
                            format!("choices[{i}].routed_experts"),
                            "missing (server started without --enable-return-routed-experts?)",
                        ));
                    }
                    (c.routed_experts, b.prompt_routed_experts, known)
                }
                None => {
                    let known = Known {
                        prompt: b.prompt_token_ids.map(|p| p.len()).or(usage_prompt),
                        completion: b.token_ids.map(|t| t.len()),
                    };
                    if b.routed_experts.is_none() && b.prompt_routed_experts.is_none() {
                        return Err(TraceError::json(FIELD, "missing"));
                    }
                    (b.routed_experts, b.prompt_routed_experts, known)
                }
            }
        }
    };
    let meta = known.apply(meta)?;
    let nested = |r: Option<Routes>, name: &str| -> Result<Option<Flat3>> {
        match r {
            None => Ok(None),
            Some(Routes::Nested(f)) => Ok(Some(f)),
            Some(_) => Err(TraceError::json(name, "expected nested lists next to prompt_routed_experts (vLLM 0.21)")),
        }
    };
    match (routes, prompt_routes) {
        (Some(Routes::Text(s)), None) => from_b64(&s, &meta),
        (Some(Routes::Object(_)), _) => Err(TraceError::json(
            FIELD,
            "an object: this is prime-rl's {data, shape, start, dtype} payload (use --from prime-rl)",
        )),
        (r, p) => {
            let p = nested(p, "prompt_routed_experts")?;
            if let (Some(p), Some(prompt)) = (&p, known.prompt) {
                if p.shape[0] != prompt {
                    return Err(TraceError::shape(
                        "prompt_routed_experts",
                        p.shape.to_vec(),
                        format!("one row per prompt token ({prompt})"),
                    ));
                }
            }
            nested_trace(p, nested(r, FIELD)?, &meta)
        }
    }
}

/// The smallest dtype current vLLM would write ids of `num_experts` experts in.
pub fn dtype_for(num_experts: u32) -> NpyDtype {
    if num_experts <= 256 {
        NpyDtype::U8
    } else if num_experts <= 65536 {
        NpyDtype::U16
    } else {
        NpyDtype::I32
    }
}

/// The current-form array: rows `[start, N - 1)`, `start` the first present token (write it as
/// the request's `routed_experts_prompt_start`), every decoder-layer column. `dtype` `None`:
/// [`dtype_for`].
pub fn to_array(t: &RouteTrace, dtype: Option<NpyDtype>, ex: &ExportMeta) -> Result<(NpyArray, Written)> {
    let (start, rows, last_dropped) = n_minus_one_rows(t, false, "a vLLM routed_experts array")?;
    let cols = ex.columns(t)?;
    let data = export_rows(t, start, rows, &cols, None, "a vLLM routed_experts array")?;
    let dtype = dtype.unwrap_or_else(|| dtype_for(t.meta().num_experts));
    let arr = NpyArray { dtype, shape: vec![rows, cols.len(), t.top_k().unwrap_or(0)], data };
    Ok((arr, Written { start, rows, last_dropped }))
}

/// `.npy` bytes of [`to_array`].
pub fn to_npy(t: &RouteTrace, dtype: Option<NpyDtype>, ex: &ExportMeta) -> Result<(Vec<u8>, Written)> {
    let (arr, w) = to_array(t, dtype, ex)?;
    Ok((write_npy(&arr)?, w))
}

/// The current form's `routed_experts` string (base64 of [`to_npy`]).
pub fn to_b64(t: &RouteTrace, dtype: Option<NpyDtype>, ex: &ExportMeta) -> Result<(String, Written)> {
    let (bytes, w) = to_npy(t, dtype, ex)?;
    Ok((b64_encode(&bytes), w))
}

/// vLLM 0.21's pair `(prompt_routed_experts, routed_experts)`: rows `0..N - 1` split at
/// `meta.prompt_len`, `-1` rows for missing tokens.
pub fn to_prompt_and_completion(
    t: &RouteTrace,
    dtype: NpyDtype,
    ex: &ExportMeta,
) -> Result<(NpyArray, NpyArray, Written)> {
    let (_, rows, last_dropped) = n_minus_one_rows(t, true, "vLLM 0.21 routed experts")?;
    let cols = ex.columns(t)?;
    let k = t.top_k().unwrap_or(0);
    let p = (t.meta().prompt_len as usize).min(rows);
    let fill = if matches!(dtype, NpyDtype::U8 | NpyDtype::U16) { None } else { Some(-1) };
    let arr = |first: usize, count: usize| -> Result<NpyArray> {
        let data = export_rows(t, first, count, &cols, fill, "unsigned vLLM arrays")?;
        Ok(NpyArray { dtype, shape: vec![count, cols.len(), k], data })
    };
    Ok((arr(0, p)?, arr(p, rows - p)?, Written { start: 0, rows, last_dropped }))
}

/// vLLM 0.21 JSON: `{"prompt_routed_experts": [...], "routed_experts": [...]}` (nested lists,
/// `-1` rows for missing tokens).
pub fn to_json_v021(t: &RouteTrace, ex: &ExportMeta) -> Result<(Value, Written)> {
    let (p, c, w) = to_prompt_and_completion(t, NpyDtype::I16, ex)?;
    let nest = |a: &NpyArray| -> Value {
        let (cols, k) = (a.shape[1], a.shape[2]);
        Value::Array(
            (0..a.shape[0])
                .map(|r| {
                    Value::Array(
                        (0..cols)
                            .map(|c| {
                                Value::Array(
                                    a.data[(r * cols + c) * k..(r * cols + c + 1) * k]
                                        .iter()
                                        .map(|&x| x.into())
                                        .collect(),
                                )
                            })
                            .collect(),
                    )
                })
                .collect(),
        )
    };
    let mut m = serde_json::Map::new();
    m.insert("prompt_routed_experts".into(), nest(&p));
    m.insert(FIELD.into(), nest(&c));
    Ok((Value::Object(m), w))
}
