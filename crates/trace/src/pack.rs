//! Packing samples into token-budget micro-batches (first-fit-decreasing), route rows aligned
//! to their tokens, and unpacking back.
//!
//! **Route-free convention.** In a [`MicroBatch`], a row routes freely (the replay path
//! computes the router's own top-k) when `route_free[t]` is true; every id of such a row is
//! [`ROUTE_FREE`] (`u32::MAX`) and its probabilities are 0. Rows are free for padding tokens,
//! for tokens a foreign engine did not provide a route for (missing rows), and for samples
//! without routes (listed by [`MicroBatch::samples_without_routes`]: the trainer falls back to
//! token-only importance sampling for them).
//!
//! The packer handles fixed top-k traces only: a sample with variable-count (expert-choice)
//! rows is rejected with an error naming it. All routed samples must share MoE layers and k.

use crate::error::{Result, TraceError};
use crate::probs::{ProbDtype, Probs};
use crate::trace::{RouteTrace, TraceMeta};
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
    /// Decoder-layer ids of the MoE layers of `route_ids` (empty when no sample has routes).
    pub layers: Vec<u32>,
    pub top_k: usize,
    /// `[token][layer][k]` expert ids; free rows all [`ROUTE_FREE`].
    pub route_ids: Vec<u32>,
    /// Probabilities aligned with `route_ids` when any sample has them (0 where unknown).
    pub route_probs: Option<Vec<f32>>,
    /// Per token: route freely (padding, missing row, or sample without routes).
    pub route_free: Vec<bool>,
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
    /// Ids of `(token, layer_index)`.
    pub fn route_row(&self, token: usize, layer: usize) -> &[u32] {
        let i = (token * self.layers.len() + layer) * self.top_k;
        &self.route_ids[i..i + self.top_k]
    }
    /// Samples in this batch that came without routes.
    pub fn samples_without_routes(&self) -> Vec<usize> {
        self.sequences.iter().filter(|s| s.routes.is_none()).map(|s| s.sample).collect()
    }
    /// Number of route-free rows that belong to real tokens (missing rows + unrouted samples).
    pub fn free_token_rows(&self) -> usize {
        self.route_free.iter().take(self.len() - self.num_padding).filter(|&&f| f).count()
    }
}

fn check_sample(i: usize, s: &Sample, cfg: &PackConfig, shape: &mut Option<(Vec<u32>, usize)>) -> Result<()> {
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
        let k = r.top_k().ok_or_else(|| {
            TraceError::invalid(
                format!("sample[{i}].routes"),
                "variable-count (expert-choice) rows are not supported by the packer",
            )
        })?;
        if r.num_tokens() != n {
            return Err(TraceError::shape(
                format!("sample[{i}].routes"),
                vec![r.num_tokens()],
                format!("[{n} tokens]"),
            ));
        }
        match shape {
            None => *shape = Some((r.layers().to_vec(), k)),
            Some((l, kk)) if l.as_slice() == r.layers() && *kk == k => {}
            Some((l, kk)) => {
                return Err(TraceError::invalid(
                    format!("sample[{i}].routes"),
                    format!("layers {:?} / top_k {k} differ from other samples ({l:?} / {kk})", r.layers()),
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
    let (layers, k) = shape.unwrap_or((Vec::new(), 0));
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
    Ok(bins
        .into_iter()
        .map(|(used, mut members)| {
            members.sort_unstable();
            build_batch(samples, &members, used, cfg, &layers, k, with_probs)
        })
        .collect())
}

fn build_batch(
    samples: &[Sample],
    members: &[usize],
    used: usize,
    cfg: &PackConfig,
    layers: &[u32],
    k: usize,
    with_probs: bool,
) -> MicroBatch {
    let total = used.div_ceil(cfg.pad_to_multiple) * cfg.pad_to_multiple;
    let row = layers.len() * k;
    let mut b = MicroBatch {
        tokens: Vec::with_capacity(total),
        position_ids: Vec::with_capacity(total),
        cu_seqlens: vec![0],
        sequences: Vec::with_capacity(members.len()),
        loss_mask: Vec::with_capacity(total),
        advantages: Vec::with_capacity(total),
        logprobs: Vec::with_capacity(total),
        layers: layers.to_vec(),
        top_k: k,
        route_ids: Vec::with_capacity(total * row),
        route_probs: with_probs.then(|| Vec::with_capacity(total * row)),
        route_free: Vec::with_capacity(total),
        num_padding: total - used,
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
                for t in 0..r.num_tokens() {
                    let free = r.is_missing(t);
                    b.route_free.push(free);
                    let span = t * row..(t + 1) * row;
                    if free {
                        b.route_ids.extend(std::iter::repeat_n(ROUTE_FREE, row));
                    } else {
                        b.route_ids.extend(r.ids()[span.clone()].iter().map(|&x| x as u32));
                    }
                    if let Some(p) = &mut b.route_probs {
                        match r.probs() {
                            Some(rp) if !free => p.extend(span.map(|j| rp.get_f32(j))),
                            _ => p.extend(std::iter::repeat_n(0.0, row)),
                        }
                    }
                }
            }
            None => push_free(&mut b, s.tokens.len(), row),
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
    push_free(&mut b, pad, row);
    b
}

fn push_free(b: &mut MicroBatch, n: usize, row: usize) {
    b.route_free.extend(std::iter::repeat_n(true, n));
    b.route_ids.extend(std::iter::repeat_n(ROUTE_FREE, n * row));
    if let Some(p) = &mut b.route_probs {
        p.extend(std::iter::repeat_n(0.0, n * row));
    }
}

/// Inverse of [`pack`]: the samples, in their original order.
pub fn unpack(batches: &[MicroBatch]) -> Result<Vec<Sample>> {
    let mut out: Vec<Option<Sample>> = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        let row = b.layers.len() * b.top_k;
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
        if b.route_probs.as_ref().is_some_and(|p| p.len() != n * row) {
            let len = b.route_probs.as_ref().map_or(0, |p| p.len());
            return Err(TraceError::shape(format!("batch[{bi}].route_probs"), vec![len], format!("[{n} x {row}]")));
        }
        if b.route_ids.len() != n * row || b.route_free.len() != n {
            return Err(TraceError::shape(
                format!("batch[{bi}].route_ids"),
                vec![b.route_ids.len()],
                format!("[{n} x {row}]"),
            ));
        }
        for (si, s) in b.sequences.iter().enumerate() {
            let r = s.start..s.start.saturating_add(s.len);
            if r.end > n || s.start.checked_add(s.len).is_none() {
                return Err(TraceError::invalid(format!("batch[{bi}].sequences[{si}]"), "extends past the batch"));
            }
            let routes = match &s.routes {
                None => None,
                Some(sr) => {
                    let missing: Vec<bool> = b.route_free[r.clone()].to_vec();
                    let ids = &b.route_ids[r.start * row..r.end * row];
                    let probs = match (sr.prob_dtype, &b.route_probs) {
                        (Some(dt), Some(p)) => Some(Probs::from_f32(dt, &p[r.start * row..r.end * row])),
                        (Some(_), None) => {
                            return Err(TraceError::invalid(
                                format!("batch[{bi}].route_probs"),
                                "missing but a sequence has probabilities",
                            ))
                        }
                        _ => None,
                    };
                    Some(RouteTrace::from_u32(sr.meta.clone(), b.layers.clone(), s.len, ids, missing, probs).map_err(
                        |e| TraceError::invalid(format!("batch[{bi}].sequences[{si}].routes"), e.to_string()),
                    )?)
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
