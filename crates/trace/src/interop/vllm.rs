//! vLLM: `routed_experts` / `prompt_routed_experts` arrays `[tokens, moe_layers, top_k]`
//! (int16 or int32 `.npy`), and the OpenAI-response nested lists.
//!
//! vLLM returns `N - 1` rows for `N` tokens: by default an array of `R` rows imports as
//! `R + 1` tokens with the last one explicitly missing (pass `num_tokens = R` for an array that
//! has every row). Exports write `N - 1` rows when exactly the last token is missing, `N` rows
//! when none is, and fail when a missing row sits anywhere else.

use super::{build_trace, export_rows, Dense, ImportMeta};
use crate::error::{Result, TraceError};
use crate::npy::{read_npy, write_npy, NpyArray, NpyDtype};
use crate::trace::RouteTrace;
use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};

fn tokens_for(rows: usize, meta: &ImportMeta, field: &str, shape: &[usize]) -> Result<usize> {
    match meta.num_tokens {
        None => Ok(rows + 1),
        Some(n) if n == rows || n == rows + 1 => Ok(n),
        Some(n) => Err(TraceError::shape(field, shape.to_vec(), format!("{n} tokens (vLLM gives N or N-1 rows)"))),
    }
}

fn check3(arr: &NpyArray, field: &str) -> Result<()> {
    if arr.shape.len() != 3 {
        return Err(TraceError::shape(field, arr.shape.clone(), "[tokens, moe_layers, top_k]"));
    }
    Ok(())
}

/// Imports a `routed_experts` array (all tokens of the sequence).
pub fn from_array(arr: &NpyArray, meta: &ImportMeta) -> Result<RouteTrace> {
    check3(arr, "routed_experts")?;
    let (r, l, k) = (arr.shape[0], arr.shape[1], arr.shape[2]);
    let n = tokens_for(r, meta, "routed_experts", &arr.shape)?;
    build_trace(
        Dense { data: &arr.data, rows: r, cols: l, k },
        0,
        n,
        meta.prompt_len.unwrap_or(0),
        meta,
        "routed_experts",
    )
}

/// Imports `prompt_routed_experts` (`[P, L, K]`) followed by `routed_experts` (completion
/// rows); the prompt length becomes `P`.
pub fn from_prompt_and_completion(prompt: &NpyArray, completion: &NpyArray, meta: &ImportMeta) -> Result<RouteTrace> {
    check3(prompt, "prompt_routed_experts")?;
    check3(completion, "routed_experts")?;
    if prompt.shape[1..] != completion.shape[1..] {
        return Err(TraceError::shape(
            "prompt_routed_experts",
            prompt.shape.clone(),
            format!("the layers / top_k of routed_experts {:?}", completion.shape),
        ));
    }
    let mut data: Vec<i32> = prompt.data.clone();
    data.extend_from_slice(&completion.data);
    let r = prompt.shape[0] + completion.shape[0];
    let shape = [r, completion.shape[1], completion.shape[2]];
    let n = tokens_for(r, meta, "routed_experts", &shape)?;
    build_trace(
        Dense { data: &data, rows: r, cols: shape[1], k: shape[2] },
        0,
        n,
        prompt.shape[0] as u32,
        meta,
        "routed_experts",
    )
}

/// Imports a `.npy` file's bytes.
pub fn from_npy(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    from_array(&read_npy(bytes)?, meta)
}

/// Rows to export: `N - 1` if only the last token is missing, `N` if none is.
fn export_len(t: &RouteTrace) -> Result<usize> {
    let n = t.num_tokens();
    match t.missing().iter().position(|&m| m) {
        None => Ok(n),
        Some(p) if p + 1 == n => Ok(n - 1),
        Some(p) => Err(TraceError::invalid(
            format!("missing[{p}]"),
            format!("token {p} has no routes; vLLM arrays can only omit the last row"),
        )),
    }
}

fn array(t: &RouteTrace, first: usize, rows: usize, dtype: NpyDtype) -> Result<NpyArray> {
    let k = t.top_k().unwrap_or(0);
    let data = export_rows(t, first, rows, "a vLLM array")?;
    Ok(NpyArray { dtype, shape: vec![rows, t.num_layers(), k], data })
}

/// The whole sequence as one `routed_experts` array.
pub fn to_array(t: &RouteTrace, dtype: NpyDtype) -> Result<NpyArray> {
    array(t, 0, export_len(t)?, dtype)
}

/// `(prompt_routed_experts, routed_experts)` split at `meta.prompt_len`.
pub fn to_prompt_and_completion(t: &RouteTrace, dtype: NpyDtype) -> Result<(NpyArray, NpyArray)> {
    let rows = export_len(t)?;
    let p = (t.meta().prompt_len as usize).min(rows);
    Ok((array(t, 0, p, dtype)?, array(t, p, rows - p, dtype)?))
}

/// `.npy` bytes of [`to_array`].
pub fn to_npy(t: &RouteTrace, dtype: NpyDtype) -> Result<Vec<u8>> {
    write_npy(&to_array(t, dtype)?)
}

/// A regular nested list `[[[int; k]; layers]; rows]`, flattened while parsing.
struct Flat3 {
    shape: [usize; 3],
    data: Vec<i64>,
}

impl<'de> Deserialize<'de> for Flat3 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Flat3;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a nested list [tokens][layers][top_k] of integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Flat3, A::Error> {
                let mut f = Flat3 { shape: [0, usize::MAX, usize::MAX], data: Vec::new() };
                while seq.next_element_seed(Level { f: &mut f, depth: 1 })?.is_some() {
                    f.shape[0] += 1;
                }
                for d in &mut f.shape[1..] {
                    if *d == usize::MAX {
                        *d = 0; // no list at this depth was seen
                    }
                }
                Ok(f)
            }
        }
        d.deserialize_seq(V)
    }
}

struct Level<'a> {
    f: &'a mut Flat3,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a list at depth {}", self.depth)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut n = 0usize;
        if self.depth == 1 {
            while seq.next_element_seed(Level { f: &mut *self.f, depth: 2 })?.is_some() {
                n += 1;
            }
        } else {
            while let Some(x) = seq.next_element::<i64>()? {
                self.f.data.push(x);
                n += 1;
            }
        }
        let want = &mut self.f.shape[self.depth];
        if *want == usize::MAX {
            *want = n;
        } else if *want != n {
            let what = if self.depth == 1 { "layers" } else { "experts" };
            return Err(A::Error::custom(format!("ragged list: {n} {what} where earlier rows have {}", *want)));
        }
        Ok(())
    }
}

/// Imports the OpenAI-response form: a bare nested list, or an object with `routed_experts`
/// (and optionally `prompt_routed_experts`, which sets the prompt length).
pub fn from_json(bytes: &[u8], meta: &ImportMeta) -> Result<RouteTrace> {
    #[derive(serde::Deserialize)]
    struct Obj {
        routed_experts: Option<Flat3>,
        #[serde(default)]
        prompt_routed_experts: Option<Flat3>,
    }
    let text = std::str::from_utf8(bytes).map_err(|_| TraceError::json("routed_experts", "not UTF-8"))?;
    let first = text.trim_start().as_bytes().first().copied();
    let (prompt, comp) = if first == Some(b'[') {
        let f: Flat3 = serde_json::from_str(text).map_err(|e| TraceError::json("routed_experts", e.to_string()))?;
        (None, f)
    } else {
        let o: Obj = serde_json::from_str(text).map_err(|e| TraceError::json("routed_experts", e.to_string()))?;
        let r = o.routed_experts.ok_or_else(|| TraceError::json("routed_experts", "missing"))?;
        (o.prompt_routed_experts, r)
    };
    let (mut data, mut rows, mut prompt_len) = (Vec::new(), 0usize, meta.prompt_len.unwrap_or(0));
    let shape = comp.shape;
    if let Some(p) = prompt {
        if p.shape[0] > 0 && shape[0] > 0 && p.shape[1..] != shape[1..] {
            return Err(TraceError::shape(
                "prompt_routed_experts",
                p.shape.to_vec(),
                format!("layers / top_k of {shape:?}"),
            ));
        }
        rows += p.shape[0];
        prompt_len = p.shape[0] as u32;
        data = p.data;
        if shape[0] == 0 {
            return finish(&data, rows, p.shape, prompt_len, meta);
        }
    }
    rows += shape[0];
    data.extend(comp.data);
    finish(&data, rows, shape, prompt_len, meta)
}

fn finish(data: &[i64], rows: usize, shape: [usize; 3], prompt_len: u32, meta: &ImportMeta) -> Result<RouteTrace> {
    let s = [rows, shape[1], shape[2]];
    let n = tokens_for(rows, meta, "routed_experts", &s)?;
    build_trace(Dense { data, rows, cols: shape[1], k: shape[2] }, 0, n, prompt_len, meta, "routed_experts")
}

/// OpenAI-response JSON: `{"prompt_routed_experts": [...], "routed_experts": [...]}` (the prompt
/// key only when `prompt_len > 0`).
pub fn to_json(t: &RouteTrace) -> Result<serde_json::Value> {
    let rows = export_len(t)?;
    let (nl, k) = (t.num_layers(), t.top_k().unwrap_or(0));
    let nest = |first: usize, count: usize| -> Result<serde_json::Value> {
        let d = export_rows(t, first, count, "vLLM JSON")?;
        let row = |i: usize| serde_json::Value::Array(d[i * k..(i + 1) * k].iter().map(|&x| x.into()).collect());
        Ok(serde_json::Value::Array(
            (0..count).map(|tok| serde_json::Value::Array((0..nl).map(|l| row(tok * nl + l)).collect())).collect(),
        ))
    };
    let p = (t.meta().prompt_len as usize).min(rows);
    let mut m = serde_json::Map::new();
    if p > 0 {
        m.insert("prompt_routed_experts".into(), nest(0, p)?);
    }
    m.insert("routed_experts".into(), nest(p, rows - p)?);
    Ok(serde_json::Value::Object(m))
}
