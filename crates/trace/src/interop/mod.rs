//! Conversions between [`RouteTrace`] and the route payloads of other systems.
//!
//! Foreign payloads carry ids in selection order, so imports are `ordered` by default and a
//! round trip foreign → lockstep (file) → foreign is bitwise.
//!
//! **Rows.** Rows a foreign engine did not provide become explicit missing rows, never
//! zero-filled ones: vLLM, SGLang and prime-rl's inference payload cover tokens
//! `[start, N - 1)` (the last sampled token was never forwarded), so by default `R` rows at
//! `start` import as `start + R + 1` tokens whose first `start` and last are missing; vLLM
//! 0.21's `-1` rows (prefix-cached positions) import as missing; the prime-rl trainer
//! transport covers all `N` tokens and zero-pads the ones it had no routes for.
//!
//! **Columns.** vLLM and SGLang write one column per decoder layer (`num_hidden_layers`), dense
//! layers included and left as their capture buffers were filled (zeros). An import keeps the
//! MoE columns ([`ImportMeta::layers`], or a [`ModelLayout`] from `config.json`); without them a
//! column is dense when every row of it repeats one value (a real top-k >= 2 row never holds an
//! id twice) — with top-1 that test is ambiguous and the import refuses, asking for the model
//! config. Exports write columns `0..num_hidden_layers` ([`ExportMeta`]), dense ones zero.

mod layout;
mod nested;
pub mod prime_rl;
pub mod sglang;
pub mod vllm;

pub use layout::ModelLayout;

use crate::error::{Result, TraceError};
use crate::trace::{RouteTrace, TraceMeta, MAX_EXPERTS};

/// What a foreign payload does not say about itself.
#[derive(Debug, Clone)]
pub struct ImportMeta {
    /// Experts per layer; `None` infers `max id + 1` (a lower bound: pass it when known).
    pub num_experts: Option<u32>,
    /// Decoder-layer ids of the MoE layers. A payload with as many columns holds exactly these
    /// layers (lockstep's compact layout); one with more holds decoder layers `0..columns`, and
    /// the columns not listed are dense (they must hold only 0 or -1, as upstream fills them).
    /// `None`: detected (module docs).
    pub layers: Option<Vec<u32>>,
    /// Decoder layers of the model (`num_hidden_layers`): the column count of a full payload;
    /// checked when given, and what splits SGLang's flattened data.
    pub num_hidden_layers: Option<u32>,
    /// Experts per token and layer (needed where the payload has no shape, i.e. SGLang).
    pub top_k: Option<u32>,
    /// Tokens in the sequence; default: the format's convention (module docs).
    pub num_tokens: Option<usize>,
    /// First token the rows belong to where the payload does not say (vLLM's
    /// `routed_experts_prompt_start` of the request; default 0).
    pub start: Option<usize>,
    /// Prompt length (default 0, or what the payload says).
    pub prompt_len: Option<u32>,
    /// Which choice of a whole response (`choices[i]`, default 0).
    pub choice: usize,
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
            num_hidden_layers: None,
            top_k: None,
            num_tokens: None,
            start: None,
            prompt_len: None,
            choice: 0,
            fingerprint: 0,
            policy_version: 0,
            ordered: true,
            max_ids: 1 << 31,
        }
    }
}

impl ImportMeta {
    /// Takes experts, top-k, the MoE layers and the decoder-layer count from `layout`; a value
    /// already set that disagrees is an error naming it.
    pub fn with_layout(mut self, layout: &ModelLayout) -> Result<Self> {
        fn merge<T: PartialEq + std::fmt::Debug + Clone>(slot: &mut Option<T>, v: &T, field: &str) -> Result<()> {
            match slot {
                Some(x) if x != v => {
                    Err(TraceError::invalid(field, format!("{x:?} disagrees with the model config's {v:?}")))
                }
                _ => {
                    *slot = Some(v.clone());
                    Ok(())
                }
            }
        }
        merge(&mut self.num_experts, &layout.num_experts, "num_experts")?;
        merge(&mut self.top_k, &layout.top_k, "top_k")?;
        merge(&mut self.layers, &layout.moe_layers, "layers")?;
        merge(&mut self.num_hidden_layers, &layout.num_hidden_layers, "num_hidden_layers")?;
        Ok(self)
    }
}

/// Which rows an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// First token of the rows (the `start` / `routed_experts_prompt_start` a reader needs).
    pub start: usize,
    /// Rows written.
    pub rows: usize,
    /// The last token had routes, but the format has no row for it (`[start, N - 1)`).
    pub last_dropped: bool,
}

/// How exports lay out their layer columns.
#[derive(Debug, Clone, Default)]
pub struct ExportMeta {
    /// Decoder layers to write (`num_hidden_layers`); default: the last MoE layer + 1.
    pub num_hidden_layers: Option<u32>,
    /// Write the MoE layers only (lockstep's compact layout) instead of every decoder layer.
    pub compact: bool,
}

impl ExportMeta {
    /// Every decoder layer of `layout`.
    pub fn of(layout: &ModelLayout) -> Self {
        ExportMeta { num_hidden_layers: Some(layout.num_hidden_layers), compact: false }
    }

    /// For each output column, the trace's layer index it holds (`None`: a dense layer).
    pub(crate) fn columns(&self, t: &RouteTrace) -> Result<Vec<Option<usize>>> {
        let layers = t.layers();
        if self.compact {
            return Ok((0..layers.len()).map(Some).collect());
        }
        let need = layers.last().map(|&l| l + 1).unwrap_or(0);
        let n = self.num_hidden_layers.unwrap_or(need);
        if n < need {
            return Err(TraceError::invalid(
                "num_hidden_layers",
                format!("{n} decoder layers, but the trace routes layer {}", need - 1),
            ));
        }
        Ok((0..n).map(|c| layers.binary_search(&c).ok()).collect())
    }
}

/// A dense `[rows][cols][k]` block of ids as parsed from a payload.
pub(crate) struct Dense<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) k: usize,
}

/// What marks a row the foreign engine had no routes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// `-1` in every MoE cell (vLLM 0.21's prefix-cached positions).
    MinusOne,
    /// `-1`, or (top-k >= 2, where it cannot be a route) `0` in every MoE cell: prime-rl's
    /// trainer transport zero-pads the tokens it had no routes for.
    MinusOneOrZero,
}

/// Which payload columns are MoE layers: `(decoder-layer ids, column indices)`.
fn moe_columns<T: Copy + Into<i64>>(
    d: &Dense<'_, T>,
    meta: &ImportMeta,
    field: &str,
) -> Result<(Vec<u32>, Vec<usize>)> {
    let Dense { data, rows, cols, k } = *d;
    if let Some(n) = meta.num_hidden_layers {
        let compact = meta.layers.as_ref().is_some_and(|l| l.len() == cols);
        if n as usize != cols && !compact {
            return Err(TraceError::shape(
                field,
                vec![rows, cols, k],
                format!("{n} decoder layers (num_hidden_layers)"),
            ));
        }
    }
    match &meta.layers {
        Some(l) if l.len() == cols => Ok((l.clone(), (0..cols).collect())),
        Some(l) if l.len() < cols => {
            if let Some(&bad) = l.iter().find(|&&x| x as usize >= cols) {
                return Err(TraceError::invalid("layers", format!("MoE layer {bad} beyond the {cols} layer columns")));
            }
            Ok((l.clone(), l.iter().map(|&x| x as usize).collect()))
        }
        Some(l) => Err(TraceError::shape(
            field,
            vec![rows, cols, k],
            format!("{} MoE layers given (payload has fewer layer columns)", l.len()),
        )),
        None => {
            let cell = |r: usize, c: usize| &data[(r * cols + c) * k..(r * cols + c + 1) * k];
            // rows with a value other than -1 (the rest are unknown rows and tell nothing)
            let known: Vec<usize> =
                (0..rows).filter(|&r| data[r * cols * k..(r + 1) * cols * k].iter().any(|&x| x.into() != -1)).collect();
            let zero = |c: usize| !known.is_empty() && known.iter().all(|&r| cell(r, c).iter().all(|&x| x.into() == 0));
            if k == 1 && cols > 1 {
                if let Some(c) = (0..cols).find(|&c| zero(c)) {
                    return Err(TraceError::invalid(
                        format!("{field}[..][{c}]"),
                        "an all-zero column with top-1 routing: a dense layer cannot be told from routing every \
                         token to expert 0; pass the model's config.json (--model-config) or the MoE layers (--layers)",
                    ));
                }
            }
            let keep: Vec<usize> = (0..cols).filter(|&c| k == 1 || !zero(c)).collect();
            let keep = if keep.is_empty() { (0..cols).collect() } else { keep };
            Ok((keep.iter().map(|&c| c as u32).collect(), keep))
        }
    }
}

/// Builds a fixed top-k trace from a dense `[rows][cols][k]` block whose row `i` is token
/// `first + i`; all other tokens of `0..num_tokens`, and the rows `unknown` marks, are missing.
pub(crate) fn build_trace<T: Copy + Into<i64>>(
    dense: Dense<'_, T>,
    first: usize,
    num_tokens: usize,
    prompt_len: u32,
    meta: &ImportMeta,
    field: &str,
    unknown: Unknown,
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
    if let Some(want) = meta.top_k {
        if want as usize != k {
            return Err(TraceError::shape(field, vec![rows, cols, k], format!("top_k {want}")));
        }
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
    let d = Dense { data, rows, cols, k };
    let (layers, keep) = moe_columns(&d, meta, field)?;
    let is_moe: Vec<bool> = (0..cols).map(|c| keep.contains(&c)).collect();
    let cap = meta.num_experts.unwrap_or(MAX_EXPERTS) as i64;
    let mut unknown_row = vec![false; rows];
    let mut max_id = -1i64;
    for (r, unk) in unknown_row.iter_mut().enumerate() {
        let row = &data[r * cols * k..(r + 1) * cols * k];
        let moe = || keep.iter().flat_map(|&c| row[c * k..(c + 1) * k].iter().map(|&x| x.into()));
        *unk = !keep.is_empty()
            && (moe().all(|x| x == -1) || (unknown == Unknown::MinusOneOrZero && k >= 2 && moe().all(|x| x == 0)));
        for c in 0..cols {
            let cell = &row[c * k..(c + 1) * k];
            if !is_moe[c] {
                // a dense column holds what the capture buffer was filled with
                let v0: i64 = cell[0].into();
                if (v0 != 0 && v0 != -1) || cell.iter().any(|&x| x.into() != v0) {
                    return Err(TraceError::invalid(
                        format!("{field}[{r}][{c}]"),
                        "dense layer column (not in layers) holds routes (only 0 or -1 fill is allowed)",
                    ));
                }
                continue;
            }
            if *unk {
                continue;
            }
            for (j, &x) in cell.iter().enumerate() {
                let x: i64 = x.into();
                if x < 0 || x >= cap {
                    return Err(TraceError::ExpertOutOfRange {
                        field: format!("{field}[{r}][{c}][{j}]"),
                        id: x,
                        num_experts: cap as u32,
                    });
                }
                max_id = max_id.max(x);
            }
        }
    }
    let num_experts = meta.num_experts.unwrap_or((max_id + 1).max(k as i64) as u32);
    let nl = keep.len();
    let mut ids = vec![crate::MISSING_ID; num_tokens * nl * k];
    for r in (0..rows).filter(|&r| !unknown_row[r]) {
        for (j, &c) in keep.iter().enumerate() {
            let src = &data[(r * cols + c) * k..(r * cols + c + 1) * k];
            let dst = &mut ids[((first + r) * nl + j) * k..((first + r) * nl + j + 1) * k];
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s.into() as u16;
            }
        }
    }
    let missing = (0..num_tokens).map(|t| t < first || t >= first + rows || unknown_row[t - first]).collect();
    let tm = TraceMeta {
        num_experts,
        top_k: k as u32,
        prompt_len: prompt_len.min(num_tokens as u32),
        fingerprint: meta.fingerprint,
        policy_version: meta.policy_version,
        ordered: meta.ordered,
    };
    RouteTrace::new(tm, layers, num_tokens, ids, missing, None).map_err(|e| match e {
        TraceError::Invalid { field: f, msg } => TraceError::Invalid { field: format!("{field}: {f}"), msg },
        other => other,
    })
}

/// Rows `first..first + count` of a fixed top-k trace as `[count][columns][k]` values, dense
/// columns 0; a missing token's row is `missing` in every cell, or an error when `None`.
pub(crate) fn export_rows(
    t: &RouteTrace,
    first: usize,
    count: usize,
    columns: &[Option<usize>],
    missing: Option<i32>,
    format: &str,
) -> Result<Vec<i32>> {
    let k = t.top_k().ok_or_else(|| {
        TraceError::invalid("top_k", format!("variable-count (expert-choice) rows cannot be written as {format}"))
    })?;
    let mut out = Vec::with_capacity(count * columns.len() * k);
    for tok in first..first + count {
        if t.is_missing(tok) {
            let fill = missing.ok_or_else(|| {
                TraceError::invalid(
                    format!("missing[{tok}]"),
                    format!("token {tok} has no routes and {format} cannot mark a missing row there"),
                )
            })?;
            out.extend(std::iter::repeat_n(fill, columns.len() * k));
            continue;
        }
        for col in columns {
            match col {
                Some(l) => out.extend(t.ids()[t.row_range(tok, *l)].iter().map(|&x| x as i32)),
                None => out.extend(std::iter::repeat_n(0, k)),
            }
        }
    }
    Ok(out)
}

/// The rows a `[start, N - 1)` format writes: `(start, count, last_dropped)`, `start` the first
/// present token; the tokens from `start` to `N - 2` must be present unless `holes` (then the
/// caller marks them), and a present last token cannot be written (`last_dropped`).
pub(crate) fn n_minus_one_rows(t: &RouteTrace, holes: bool, format: &str) -> Result<(usize, usize, bool)> {
    let n = t.num_tokens();
    if n == 0 {
        return Err(TraceError::invalid("num_tokens", format!("{format} needs at least one token")));
    }
    let start = if holes { 0 } else { t.missing()[..n - 1].iter().position(|&m| !m).unwrap_or(n - 1) };
    if !holes {
        if let Some(p) = (start..n - 1).find(|&p| t.is_missing(p)) {
            return Err(TraceError::invalid(
                format!("missing[{p}]"),
                format!("token {p} has no routes; {format} rows cover tokens [start, N - 1) without gaps"),
            ));
        }
    }
    Ok((start, n - 1 - start, !t.is_missing(n - 1)))
}

/// Tokens of a `[start, N - 1)` payload of `rows` rows: `meta.num_tokens` (which may also say
/// the rows run to the end), else `start + rows + 1`.
pub(crate) fn tokens_n_minus_one(
    start: usize,
    rows: usize,
    meta: &ImportMeta,
    field: &str,
    shape: &[usize],
) -> Result<usize> {
    let end = start.checked_add(rows).ok_or_else(|| TraceError::invalid("start", "overflow"))?;
    match meta.num_tokens {
        None => Ok(end + 1),
        Some(n) if n == end || n == end + 1 => Ok(n),
        Some(n) => Err(TraceError::shape(
            field,
            shape.to_vec(),
            format!("{n} tokens (rows cover tokens [{start}, N - 1), so N = {})", end + 1),
        )),
    }
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
