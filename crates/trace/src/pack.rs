//! Packing samples into token-budget micro-batches (first-fit-decreasing), route rows aligned
//! to their tokens, and unpacking back.
//!
//! **One route type.** A [`MicroBatch`]'s routes are a [`RouteTrace`] over its token slots
//! (padding included), the samples' rows back to back: the same type and `[token][layer][k]`
//! layout the samples carry, so the trainer replays it as is
//! (`lockstep_model::RoutingPlan::replay_rows`).
//!
//! **Route-free convention.** A slot routes freely (the replay path computes the router's own
//! choice) when its row is *missing* in the batch trace ([`RouteTrace::is_missing`]; as u32 ids
//! its row reads [`ROUTE_FREE`] and its probabilities 0). Rows are free for padding tokens,
//! for tokens a foreign engine did not provide a route for (missing rows), and for samples
//! without routes (listed by [`MicroBatch::samples_without_routes`]: the trainer falls back to
//! token-only importance sampling for them).
//!
//! Rows may be fixed-width (top-k, or every expert for expert choice over one-token pools) or
//! variable-count (expert choice over wider pools, where a token gets 0, 1 or many experts): the
//! batch trace is fixed-width when every routed sample is, with one width, else variable (a
//! free row then holds no ids). All routed samples must share MoE layers and expert count.

use crate::error::{Result, TraceError};
use crate::probs::{ProbDtype, Probs};
use crate::trace::{RouteTrace, TraceMeta};
#[cfg(doc)]
use crate::ROUTE_FREE;

/// One training sample (a prompt + completion sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    /// Per token: whether it contributes to the loss.
    pub loss_mask: Vec<bool>,
    /// Per token advantages.
    pub advantages: Vec<f32>,
    /// Per token log-probabilities from the inference engine.
    pub logprobs: Vec<f32>,
    /// Routes recorded at inference (`None`: route freely, token-only importance sampling).
    pub routes: Option<RouteTrace>,
}

/// Packing parameters.
#[derive(Debug, Clone)]
pub struct PackConfig {
    /// Most tokens per micro-batch (padding included).
    pub token_budget: usize,
    /// Pad every micro-batch to a multiple of this (1 = no padding); must divide the budget.
    pub pad_to_multiple: usize,
    /// Token id of padding.
    pub pad_token: u32,
}

/// Route metadata of a packed sequence, kept so unpacking rebuilds the trace exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqRoutes {
    pub meta: TraceMeta,
    pub prob_dtype: Option<ProbDtype>,
}

/// One sequence inside a micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqInfo {
    /// Index of the sample in the input of [`pack`].
    pub sample: usize,
    /// First token position in the micro-batch.
    pub start: usize,
    pub len: usize,
    /// `None` when the sample came without routes.
    pub routes: Option<SeqRoutes>,
}

/// A packed micro-batch: sequences back to back, then padding.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub tokens: Vec<u32>,
    /// Position within its sequence (restarts at 0 per sequence; 0 for padding).
    pub position_ids: Vec<u32>,
    /// Sequence boundaries `[0, end_0, end_1, ...]` (flash-attention varlen); padding follows
    /// the last boundary and belongs to no sequence.
    pub cu_seqlens: Vec<u32>,
    pub sequences: Vec<SeqInfo>,
    pub loss_mask: Vec<bool>,
    pub advantages: Vec<f32>,
    pub logprobs: Vec<f32>,
    /// Routes of every slot (`[token][layer][k]`, probabilities in f32 when any sample has
    /// them); `None` when no sample has routes. Missing rows route freely.
    pub routes: Option<RouteTrace>,
    /// Padding tokens at the end.
    pub num_padding: usize,
}

impl MicroBatch {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Ids of `(token, layer_index)`; `None` for a free row (or no routes).
    pub fn route_row(&self, token: usize, layer: usize) -> Option<Vec<u32>> {
        self.routes.as_ref()?.row_u32(token, layer)
    }
    /// Whether slot `token` routes freely.
    pub fn is_free(&self, token: usize) -> bool {
        self.routes.as_ref().is_none_or(|r| r.is_missing(token))
    }
    /// Samples in this batch that came without routes.
    pub fn samples_without_routes(&self) -> Vec<usize> {
        self.sequences.iter().filter(|s| s.routes.is_none()).map(|s| s.sample).collect()
    }
    /// Number of route-free rows that belong to real tokens (missing rows + unrouted samples).
    pub fn free_token_rows(&self) -> usize {
        (0..self.len() - self.num_padding).filter(|&t| self.is_free(t)).count()
    }
}

/// The route shape of a pack: layers, width (`None`: variable rows), experts.
type Shape = (Vec<u32>, Option<usize>, u32);

fn check_sample(i: usize, s: &Sample, cfg: &PackConfig, shape: &mut Option<Shape>) -> Result<()> {
    let n = s.tokens.len();
    for (name, len) in
        [("loss_mask", s.loss_mask.len()), ("advantages", s.advantages.len()), ("logprobs", s.logprobs.len())]
    {
        if len != n {
            return Err(TraceError::shape(format!("sample[{i}].{name}"), vec![len], format!("[{n} tokens]")));
        }
    }
    if n > cfg.token_budget {
        return Err(TraceError::invalid(
            format!("sample[{i}].tokens"),
            format!("{n} tokens exceed the budget {}", cfg.token_budget),
        ));
    }
    if let Some(r) = &s.routes {
        if r.num_tokens() != n {
            return Err(TraceError::shape(
                format!("sample[{i}].routes"),
                vec![r.num_tokens()],
                format!("[{n} tokens]"),
            ));
        }
        let (k, e) = (r.top_k(), r.meta().num_experts);
        match shape {
            None => *shape = Some((r.layers().to_vec(), k, e)),
            Some((l, kk, ee)) if l.as_slice() == r.layers() && *ee == e => {
                if *kk != k {
                    *kk = None; // widths differ: variable rows
                }
            }
            Some((l, _, ee)) => {
                return Err(TraceError::invalid(
                    format!("sample[{i}].routes"),
                    format!("layers {:?} / {e} experts differ from other samples ({l:?} / {ee})", r.layers()),
                ))
            }
        }
    }
    Ok(())
}

/// First-fit-decreasing packing of `samples` under `cfg.token_budget`.
pub fn pack(samples: &[Sample], cfg: &PackConfig) -> Result<Vec<MicroBatch>> {
    if cfg.token_budget == 0 {
        return Err(TraceError::invalid("token_budget", "must be positive"));
    }
    if cfg.pad_to_multiple == 0 || cfg.token_budget % cfg.pad_to_multiple != 0 {
        return Err(TraceError::invalid(
            "pad_to_multiple",
            format!("{} must be positive and divide token_budget {}", cfg.pad_to_multiple, cfg.token_budget),
        ));
    }
    let mut shape = None;
    for (i, s) in samples.iter().enumerate() {
        check_sample(i, s, cfg, &mut shape)?;
    }
    let with_probs = samples.iter().any(|s| s.routes.as_ref().is_some_and(|r| r.probs().is_some()));

    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].tokens.len()));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let n = samples[i].tokens.len();
        match bins.iter_mut().find(|(used, _)| used + n <= cfg.token_budget) {
            Some((used, members)) => {
                *used += n;
                members.push(i);
            }
            None => bins.push((n, vec![i])),
        }
    }
    bins.into_iter()
        .map(|(used, mut members)| {
            members.sort_unstable();
            build_batch(samples, &members, used, cfg, shape.as_ref(), with_probs)
        })
        .collect()
}

fn build_batch(samples: &[Sample], members: &[usize], used: usize, cfg: &PackConfig, shape: Option<&Shape>, with_probs: bool) -> Result<MicroBatch> {
    let total = used.div_ceil(cfg.pad_to_multiple) * cfg.pad_to_multiple;
    let nl = shape.map_or(0, |(l, _, _)| l.len());
    // fixed: every row `k` ids (free rows MISSING_ID); variable: per-row counts (free rows 0)
    let fixed = shape.and_then(|(_, k, _)| *k);
    let mut b = MicroBatch {
        tokens: Vec::with_capacity(total),
        position_ids: Vec::with_capacity(total),
        cu_seqlens: vec![0],
        sequences: Vec::with_capacity(members.len()),
        loss_mask: Vec::with_capacity(total),
        advantages: Vec::with_capacity(total),
        logprobs: Vec::with_capacity(total),
        routes: None,
        num_padding: total - used,
    };
    // the batch trace's rows: ids, per-row counts, missing flags, probabilities in f32
    let mut ids: Vec<u16> = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    let mut missing: Vec<bool> = Vec::with_capacity(total);
    let mut probs: Option<Vec<f32>> = with_probs.then(Vec::new);
    let mut meta: Option<TraceMeta> = None;
    let push_free = |ids: &mut Vec<u16>, counts: &mut Vec<u32>, missing: &mut Vec<bool>, probs: &mut Option<Vec<f32>>, n: usize| {
        missing.extend(std::iter::repeat_n(true, n));
        let w = fixed.unwrap_or(0);
        counts.extend(std::iter::repeat_n(w as u32, n * nl));
        ids.extend(std::iter::repeat_n(crate::MISSING_ID, n * nl * w));
        if let Some(p) = probs {
            p.extend(std::iter::repeat_n(0.0, n * nl * w));
        }
    };
    for &i in members {
        let s = &samples[i];
        let start = b.tokens.len();
        b.tokens.extend_from_slice(&s.tokens);
        b.position_ids.extend(0..s.tokens.len() as u32);
        b.loss_mask.extend_from_slice(&s.loss_mask);
        b.advantages.extend_from_slice(&s.advantages);
        b.logprobs.extend_from_slice(&s.logprobs);
        match &s.routes {
            Some(r) => {
                meta.get_or_insert_with(|| r.meta().clone());
                for t in 0..r.num_tokens() {
                    if r.is_missing(t) {
                        push_free(&mut ids, &mut counts, &mut missing, &mut probs, 1);
                        continue;
                    }
                    missing.push(false);
                    for l in 0..nl {
                        let span = r.row_range(t, l);
                        counts.push(span.len() as u32);
                        ids.extend_from_slice(&r.ids()[span.clone()]);
                        if let Some(p) = &mut probs {
                            match r.probs() {
                                Some(rp) => p.extend(span.map(|j| rp.get_f32(j))),
                                None => p.extend(std::iter::repeat_n(0.0, span.len())),
                            }
                        }
                    }
                }
            }
            None => push_free(&mut ids, &mut counts, &mut missing, &mut probs, s.tokens.len()),
        }
        b.cu_seqlens.push(b.tokens.len() as u32);
        b.sequences.push(SeqInfo {
            sample: i,
            start,
            len: s.tokens.len(),
            routes: s.routes.as_ref().map(|r| SeqRoutes { meta: r.meta().clone(), prob_dtype: r.prob_dtype() }),
        });
    }
    let pad = total - used;
    b.tokens.extend(std::iter::repeat_n(cfg.pad_token, pad));
    b.position_ids.extend(std::iter::repeat_n(0, pad));
    b.loss_mask.extend(std::iter::repeat_n(false, pad));
    b.advantages.extend(std::iter::repeat_n(0.0, pad));
    b.logprobs.extend(std::iter::repeat_n(0.0, pad));
    push_free(&mut ids, &mut counts, &mut missing, &mut probs, pad);
    if let Some((layers, k, e)) = shape {
        // the batch is no sequence: no prompt; the first routed sample's stamp (each
        // sequence keeps its own in `sequences`); ordered as the samples' rows are
        let w = k.unwrap_or(0) as u32;
        let meta = TraceMeta { prompt_len: 0, num_experts: *e, top_k: w, ordered: true, ..meta.unwrap_or_else(|| TraceMeta::top_k(*e, w)) };
        let probs = probs.map(|p| Probs::from_f32(ProbDtype::F32, &p));
        b.routes = Some(match k {
            Some(_) => RouteTrace::new(meta, layers.clone(), total, ids, missing, probs)?,
            None => RouteTrace::new_variable(meta, layers.clone(), total, &counts, ids, missing, probs)?,
        });
    }
    Ok(b)
}

/// Inverse of [`pack`]: the samples, in their original order.
pub fn unpack(batches: &[MicroBatch]) -> Result<Vec<Sample>> {
    let mut out: Vec<Option<Sample>> = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        let n = b.tokens.len();
        for (name, len) in [
            ("position_ids", b.position_ids.len()),
            ("loss_mask", b.loss_mask.len()),
            ("advantages", b.advantages.len()),
            ("logprobs", b.logprobs.len()),
        ] {
            if len != n {
                return Err(TraceError::shape(format!("batch[{bi}].{name}"), vec![len], format!("[{n} tokens]")));
            }
        }
        if let Some(r) = &b.routes {
            if r.num_tokens() != n {
                return Err(TraceError::shape(format!("batch[{bi}].routes"), vec![r.num_tokens()], format!("[{n} tokens]")));
            }
        }
        for (si, s) in b.sequences.iter().enumerate() {
            let r = s.start..s.start.saturating_add(s.len);
            if r.end > n || s.start.checked_add(s.len).is_none() {
                return Err(TraceError::invalid(format!("batch[{bi}].sequences[{si}]"), "extends past the batch"));
            }
            let routes = match (&s.routes, &b.routes) {
                (None, _) => None,
                (Some(_), None) => return Err(TraceError::invalid(format!("batch[{bi}].routes"), "missing but a sequence has routes")),
                (Some(sr), Some(br)) => {
                    let named = |e: TraceError| TraceError::invalid(format!("batch[{bi}].sequences[{si}].routes"), e.to_string());
                    if sr.prob_dtype.is_some() && br.probs().is_none() {
                        return Err(TraceError::invalid(format!("batch[{bi}].routes.probs"), "missing but a sequence has probabilities"));
                    }
                    // the sequence's rows, back in its own form (fixed: k ids a row, MISSING_ID in
                    // missing rows; variable: the row's ids, none in missing rows)
                    let (nl, k) = (br.layers().len(), sr.meta.top_k as usize);
                    let (mut ids, mut counts, mut p) = (Vec::new(), Vec::new(), Vec::new());
                    let missing = br.missing()[r.clone()].to_vec();
                    for t in r.clone() {
                        for l in 0..nl {
                            if br.is_missing(t) {
                                counts.push(k as u32);
                                ids.extend(std::iter::repeat_n(crate::MISSING_ID, k));
                                p.extend(std::iter::repeat_n(0.0, k));
                                continue;
                            }
                            let span = br.row_range(t, l);
                            counts.push(span.len() as u32);
                            ids.extend_from_slice(&br.ids()[span.clone()]);
                            if let Some(bp) = br.probs() {
                                p.extend(span.map(|j| bp.get_f32(j)));
                            }
                        }
                    }
                    let probs = sr.prob_dtype.map(|dt| Probs::from_f32(dt, &p));
                    let trace = if k > 0 {
                        RouteTrace::new(sr.meta.clone(), br.layers().to_vec(), s.len, ids, missing, probs)
                    } else {
                        RouteTrace::new_variable(sr.meta.clone(), br.layers().to_vec(), s.len, &counts, ids, missing, probs)
                    };
                    Some(trace.map_err(named)?)
                }
            };
            let sample = Sample {
                tokens: b.tokens[r.clone()].to_vec(),
                loss_mask: b.loss_mask[r.clone()].to_vec(),
                advantages: b.advantages[r.clone()].to_vec(),
                logprobs: b.logprobs[r.clone()].to_vec(),
                routes,
            };
            if out.len() <= s.sample {
                out.resize(s.sample + 1, None);
            }
            if out[s.sample].replace(sample).is_some() {
                return Err(TraceError::invalid(
                    format!("batch[{bi}].sequences[{si}].sample"),
                    format!("sample {} appears twice", s.sample),
                ));
            }
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| TraceError::invalid(format!("sample[{i}]"), "not present in any batch")))
        .collect()
}
