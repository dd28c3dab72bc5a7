//! [`RouteTrace`]: the experts every token of one sequence was routed to, token-aligned.
//!
//! Layout of ids in memory is row-major `[token][moe_layer][k]` (vLLM's `[tokens, layers, topk]`).
//! A *row* is one `(token, layer)` pair. Rows of tokens marked missing hold [`MISSING_ID`]
//! (and zero probabilities) in the flat buffers; accessors return `None` for them, and
//! exports either express them explicitly or fail; they are never zero-filled routes.
//!
//! **Order.** Within a row, ids are in selection order (descending router probability).
//! `meta.ordered == true` promises that order round-trips exactly; with `ordered == false`
//! the constructor canonicalises every row to ascending expert id (probabilities, if any,
//! are permuted along), and only the *set* is promised. Foreign formats import as ordered.

use crate::error::{Result, TraceError};
use crate::probs::{ProbDtype, Probs};

/// Id stored in the rows of missing tokens (never a valid expert: `num_experts <= 65535`).
pub const MISSING_ID: u16 = u16::MAX;
/// Largest supported expert count.
pub const MAX_EXPERTS: u32 = 65535;

/// Per-sequence metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceMeta {
    /// Experts per MoE layer (1..=65535).
    pub num_experts: u32,
    /// Experts per row for token-choice top-k; `0` means a variable count per row (expert choice).
    pub top_k: u32,
    /// Number of prompt tokens at the start of the sequence.
    pub prompt_len: u32,
    /// Hash of the model config that produced the routes (see [`fingerprint_of`]).
    pub fingerprint: u64,
    /// Policy version (weights step) of the engine that produced the routes.
    pub policy_version: u64,
    /// Whether the within-row selection order is kept (see module docs).
    pub ordered: bool,
}

impl TraceMeta {
    /// Token-choice metadata with zero fingerprint / version, ordered rows.
    pub fn top_k(num_experts: u32, top_k: u32) -> Self {
        TraceMeta { num_experts, top_k, prompt_len: 0, fingerprint: 0, policy_version: 0, ordered: true }
    }
}

/// FNV-1a 64 of `bytes`: a stable fingerprint for a model config (e.g. its `config.json`).
pub fn fingerprint_of(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Routes of one sequence (prompt and completion, every position `0..num_tokens`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteTrace {
    pub(crate) meta: TraceMeta,
    pub(crate) layers: Vec<u32>,
    pub(crate) num_tokens: usize,
    pub(crate) missing: Vec<bool>,
    /// `None` for fixed top-k; row start offsets (`num_tokens * layers + 1`) for variable rows.
    pub(crate) offsets: Option<Vec<u64>>,
    pub(crate) ids: Vec<u16>,
    pub(crate) probs: Option<Probs>,
}

impl RouteTrace {
    /// A fixed top-k trace. `ids` is `[num_tokens][layers.len()][meta.top_k]`; the rows of
    /// tokens with `missing[t]` are ignored (stored as [`MISSING_ID`]). `probs`, if given,
    /// is aligned with `ids`.
    pub fn new(
        meta: TraceMeta,
        layers: Vec<u32>,
        num_tokens: usize,
        ids: Vec<u16>,
        missing: Vec<bool>,
        probs: Option<Probs>,
    ) -> Result<Self> {
        if meta.top_k == 0 {
            return Err(TraceError::invalid("meta.top_k", "0 means variable rows: use RouteTrace::new_variable"));
        }
        let want = num_tokens
            .checked_mul(layers.len())
            .and_then(|x| x.checked_mul(meta.top_k as usize))
            .ok_or_else(|| TraceError::invalid("ids", "tokens x layers x top_k overflows"))?;
        if ids.len() != want {
            return Err(TraceError::shape(
                "ids",
                vec![ids.len()],
                format!("[{num_tokens} tokens x {} layers x {} top_k] = {want}", layers.len(), meta.top_k),
            ));
        }
        let mut t = RouteTrace { meta, layers, num_tokens, missing, offsets: None, ids, probs };
        t.validate()?;
        Ok(t)
    }

    /// Like [`RouteTrace::new`] from `u32` ids (the model side's type); rows of missing tokens
    /// may hold anything (e.g. [`crate::ROUTE_FREE`]).
    pub fn from_u32(
        meta: TraceMeta,
        layers: Vec<u32>,
        num_tokens: usize,
        ids: &[u32],
        missing: Vec<bool>,
        probs: Option<Probs>,
    ) -> Result<Self> {
        let row = layers.len() * meta.top_k as usize;
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let t = i.checked_div(row).unwrap_or(0);
            if missing.get(t).copied().unwrap_or(false) {
                out.push(MISSING_ID);
            } else if id >= meta.num_experts || id > MAX_EXPERTS {
                return Err(TraceError::ExpertOutOfRange {
                    field: format!("ids[{i}]"),
                    id: id as i64,
                    num_experts: meta.num_experts,
                });
            } else {
                out.push(id as u16);
            }
        }
        Self::new(meta, layers, num_tokens, out, missing, probs)
    }

    /// A variable-count trace (expert choice): `counts` is `[num_tokens][layers.len()]`, `ids`
    /// the concatenated rows. Missing tokens must have count 0 in every layer.
    pub fn new_variable(
        meta: TraceMeta,
        layers: Vec<u32>,
        num_tokens: usize,
        counts: &[u32],
        ids: Vec<u16>,
        missing: Vec<bool>,
        probs: Option<Probs>,
    ) -> Result<Self> {
        if meta.top_k != 0 {
            return Err(TraceError::invalid("meta.top_k", "variable traces need top_k = 0"));
        }
        let rows = num_tokens
            .checked_mul(layers.len())
            .ok_or_else(|| TraceError::invalid("counts", "tokens x layers overflows"))?;
        if counts.len() != rows {
            return Err(TraceError::shape("counts", vec![counts.len()], format!("[{num_tokens} x {}]", layers.len())));
        }
        let mut offsets = Vec::with_capacity(rows + 1);
        let mut acc = 0u64;
        offsets.push(0);
        for &c in counts {
            acc += c as u64;
            offsets.push(acc);
        }
        if acc != ids.len() as u64 {
            return Err(TraceError::shape("ids", vec![ids.len()], format!("sum(counts) = {acc}")));
        }
        let mut t = RouteTrace { meta, layers, num_tokens, missing, offsets: Some(offsets), ids, probs };
        t.validate()?;
        Ok(t)
    }

    /// Checks every invariant and canonicalises unordered rows / missing rows.
    pub(crate) fn validate(&mut self) -> Result<()> {
        self.validate_meta()?;
        self.validate_rows()
    }

    /// Invariants that do not look at ids.
    pub(crate) fn validate_meta(&self) -> Result<()> {
        let e = self.meta.num_experts;
        if e == 0 || e > MAX_EXPERTS {
            return Err(TraceError::invalid("meta.num_experts", format!("{e} not in 1..={MAX_EXPERTS}")));
        }
        if self.meta.top_k > e {
            return Err(TraceError::invalid("meta.top_k", format!("{} > num_experts {e}", self.meta.top_k)));
        }
        if self.meta.prompt_len as usize > self.num_tokens {
            return Err(TraceError::invalid(
                "meta.prompt_len",
                format!("{} > num_tokens {}", self.meta.prompt_len, self.num_tokens),
            ));
        }
        if self.num_tokens > u32::MAX as usize {
            return Err(TraceError::invalid("num_tokens", "more than 2^32-1 tokens"));
        }
        for w in self.layers.windows(2) {
            if w[0] >= w[1] {
                return Err(TraceError::invalid("layers", format!("not strictly ascending: {} then {}", w[0], w[1])));
            }
        }
        if self.missing.len() != self.num_tokens {
            return Err(TraceError::shape(
                "missing",
                vec![self.missing.len()],
                format!("[{} tokens]", self.num_tokens),
            ));
        }
        if let Some(p) = &self.probs {
            if p.len() != self.ids.len() {
                return Err(TraceError::shape("probs", vec![p.len()], format!("[{}] like ids", self.ids.len())));
            }
        }
        Ok(())
    }

    fn validate_rows(&mut self) -> Result<()> {
        let e = self.meta.num_experts;
        let nl = self.layers.len();
        let mut scratch: Vec<(u16, usize)> = Vec::new();
        for t in 0..self.num_tokens {
            for l in 0..nl {
                let r = self.row_range(t, l);
                if self.missing[t] {
                    if self.offsets.is_some() && !r.is_empty() {
                        return Err(TraceError::invalid(
                            format!("counts[{t}][{l}]"),
                            "a missing token must have no ids",
                        ));
                    }
                    self.ids[r.clone()].fill(MISSING_ID);
                    if let Some(p) = &mut self.probs {
                        let z = Probs::zeros(p.dtype(), 1);
                        for i in r {
                            p.set_raw_from(i, &z, 0);
                        }
                    }
                    continue;
                }
                scratch.clear();
                for i in r.clone() {
                    let id = self.ids[i];
                    if id as u32 >= e {
                        return Err(TraceError::ExpertOutOfRange {
                            field: format!("ids[token {t}][layer {}]", self.layers[l]),
                            id: id as i64,
                            num_experts: e,
                        });
                    }
                    scratch.push((id, i));
                }
                scratch.sort_unstable();
                if scratch.windows(2).any(|w| w[0].0 == w[1].0) {
                    return Err(TraceError::invalid(
                        format!("ids[token {t}][layer {}]", self.layers[l]),
                        "duplicate expert id in one row",
                    ));
                }
                if !self.meta.ordered {
                    let start = r.start;
                    if let Some(p) = &mut self.probs {
                        let mut tmp = Probs::zeros(p.dtype(), scratch.len());
                        for (j, &(_, src)) in scratch.iter().enumerate() {
                            tmp.set_raw_from(j, p, src);
                        }
                        for j in 0..scratch.len() {
                            p.set_raw_from(start + j, &tmp, j);
                        }
                    }
                    for (j, &(id, _)) in scratch.iter().enumerate() {
                        self.ids[start + j] = id;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn meta(&self) -> &TraceMeta {
        &self.meta
    }
    /// Decoder-layer indices of the MoE layers covered (ascending; dense layers absent).
    pub fn layers(&self) -> &[u32] {
        &self.layers
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    /// `Some(k)` for a fixed top-k trace, `None` for variable rows.
    pub fn top_k(&self) -> Option<usize> {
        if self.offsets.is_none() {
            Some(self.meta.top_k as usize)
        } else {
            None
        }
    }
    pub fn is_variable(&self) -> bool {
        self.offsets.is_some()
    }
    pub fn missing(&self) -> &[bool] {
        &self.missing
    }
    pub fn is_missing(&self, token: usize) -> bool {
        self.missing[token]
    }
    pub fn num_missing(&self) -> usize {
        self.missing.iter().filter(|&&m| m).count()
    }
    /// Flat ids buffer (missing rows hold [`MISSING_ID`]).
    pub fn ids(&self) -> &[u16] {
        &self.ids
    }
    pub fn probs(&self) -> Option<&Probs> {
        self.probs.as_ref()
    }
    pub fn prob_dtype(&self) -> Option<ProbDtype> {
        self.probs.as_ref().map(|p| p.dtype())
    }
    /// Index range of row `(token, layer_index)` in [`RouteTrace::ids`].
    pub fn row_range(&self, token: usize, layer: usize) -> std::ops::Range<usize> {
        let row = token * self.layers.len() + layer;
        match &self.offsets {
            None => {
                let k = self.meta.top_k as usize;
                row * k..(row + 1) * k
            }
            Some(o) => o[row] as usize..o[row + 1] as usize,
        }
    }
    /// Selected experts of `(token, layer_index)`, `None` for a missing token.
    ///
    /// Panics if `token >= num_tokens` or `layer >= num_layers` (like slice indexing).
    pub fn row(&self, token: usize, layer: usize) -> Option<&[u16]> {
        if self.missing[token] {
            None
        } else {
            Some(&self.ids[self.row_range(token, layer)])
        }
    }
    /// Row as `u32` ids (the model side's type), `None` for a missing token.
    pub fn row_u32(&self, token: usize, layer: usize) -> Option<Vec<u32>> {
        self.row(token, layer).map(|r| r.iter().map(|&x| x as u32).collect())
    }
    /// Probabilities of row `(token, layer_index)` widened to f32.
    pub fn row_probs(&self, token: usize, layer: usize) -> Option<Vec<f32>> {
        let p = self.probs.as_ref()?;
        if self.missing[token] {
            return None;
        }
        Some(self.row_range(token, layer).map(|i| p.get_f32(i)).collect())
    }
    /// All ids as `u32` in `[token][layer][k]` order, rows of missing tokens as
    /// [`crate::ROUTE_FREE`] (fixed top-k traces only; `None` for variable rows).
    pub fn ids_u32(&self) -> Option<Vec<u32>> {
        if self.is_variable() {
            return None;
        }
        Some(self.ids.iter().map(|&x| if x == MISSING_ID { crate::ROUTE_FREE } else { x as u32 }).collect())
    }
    /// Per-row counts `[token][layer]` (for variable traces; fixed traces give `top_k` or 0).
    pub fn counts(&self) -> Vec<u32> {
        let nl = self.layers.len();
        (0..self.num_tokens * nl).map(|r| self.row_range(r / nl, r % nl).len() as u32).collect()
    }

    /// Err unless the routes were made by exactly `expected_version` of the model with
    /// `expected_fingerprint`.
    pub fn check_policy(&self, expected_version: u64, expected_fingerprint: u64) -> Result<()> {
        self.check_policy_within(expected_version, 0, expected_fingerprint)
    }

    /// Err unless the fingerprint matches and the trace's policy version is in
    /// `current_version - max_lag ..= current_version` (async RL tolerates bounded staleness).
    pub fn check_policy_within(&self, current_version: u64, max_lag: u64, expected_fingerprint: u64) -> Result<()> {
        if self.meta.fingerprint != expected_fingerprint {
            return Err(TraceError::Stale {
                field: "meta.fingerprint".into(),
                found: format!("{:016x}", self.meta.fingerprint),
                expected: format!("{expected_fingerprint:016x}"),
            });
        }
        let v = self.meta.policy_version;
        if v > current_version || current_version - v > max_lag {
            return Err(TraceError::Stale {
                field: "meta.policy_version".into(),
                found: v.to_string(),
                expected: if max_lag == 0 {
                    current_version.to_string()
                } else {
                    format!("{}..={current_version}", current_version.saturating_sub(max_lag))
                },
            });
        }
        Ok(())
    }

    /// The routes of tokens `start..` (a multi-turn client already holds the prefix's): the
    /// trace's tokens from `start` on, its `prompt_len` the prompt's part of them.
    pub fn tail(&self, start: usize) -> Result<RouteTrace> {
        let start = start.min(self.num_tokens);
        let nl = self.layers.len();
        let a = self.row_range(start, 0).start;
        let ids = self.ids[a..].to_vec();
        let probs = self.probs.as_ref().map(|p| {
            let mut out = Probs::zeros(p.dtype(), p.len() - a);
            for i in a..p.len() {
                out.set_raw_from(i - a, p, i);
            }
            out
        });
        let meta = TraceMeta { prompt_len: self.meta.prompt_len.saturating_sub(start as u32), ..self.meta.clone() };
        let n = self.num_tokens - start;
        let missing = self.missing[start..].to_vec();
        match &self.offsets {
            None => RouteTrace::new(meta, self.layers.clone(), n, ids, missing, probs),
            Some(_) => {
                let counts: Vec<u32> = (start * nl..self.num_tokens * nl).map(|r| self.row_range(r / nl, r % nl).len() as u32).collect();
                RouteTrace::new_variable(meta, self.layers.clone(), n, &counts, ids, missing, probs)
            }
        }
    }

    /// The same routes without router probabilities.
    pub fn without_probs(mut self) -> RouteTrace {
        self.probs = None;
        self
    }

    /// The same routes stamped with another policy version (what a server's weights are).
    pub fn with_policy_version(mut self, version: u64) -> RouteTrace {
        self.meta.policy_version = version;
        self
    }

    /// One layer's rows as `[token][k]` u32 ids, missing tokens' rows [`crate::ROUTE_FREE`]
    /// (fixed top-k traces; `None` for variable rows).
    pub fn layer_ids_u32(&self, layer: usize) -> Option<Vec<u32>> {
        let k = self.top_k()?;
        let mut out = Vec::with_capacity(self.num_tokens * k);
        for t in 0..self.num_tokens {
            match self.row(t, layer) {
                Some(r) => out.extend(r.iter().map(|&x| x as u32)),
                None => out.extend(std::iter::repeat_n(crate::ROUTE_FREE, k)),
            }
        }
        Some(out)
    }

    /// One layer's router probabilities as `[token][k]` f32 (0 on missing tokens); `None`
    /// without probabilities or for variable rows.
    pub fn layer_probs_f32(&self, layer: usize) -> Option<Vec<f32>> {
        let p = self.probs.as_ref()?;
        let k = self.top_k()?;
        let mut out = Vec::with_capacity(self.num_tokens * k);
        for t in 0..self.num_tokens {
            out.extend(self.row_range(t, layer).map(|i| if self.missing[t] { 0.0 } else { p.get_f32(i) }));
        }
        Some(out)
    }

    /// Bitwise equality (probabilities compared by bits, so NaN-safe).
    pub fn bits_eq(&self, other: &RouteTrace) -> bool {
        self.meta == other.meta
            && self.layers == other.layers
            && self.num_tokens == other.num_tokens
            && self.missing == other.missing
            && self.offsets == other.offsets
            && self.ids == other.ids
            && match (&self.probs, &other.probs) {
                (None, None) => true,
                (Some(a), Some(b)) => a.bits_eq(b),
                _ => false,
            }
    }
}
