//! Routing statistics: per-layer expert load histograms, `max_vio`, missing rows.

use crate::trace::RouteTrace;
use std::collections::BTreeMap;

/// Load of one MoE layer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerStats {
    /// Decoder-layer id.
    pub layer: u32,
    /// Token rows routed to each expert.
    pub counts: Vec<u64>,
}

impl LayerStats {
    /// Total selections in this layer.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// `(max load - mean load) / mean load` over experts (0 when nothing was routed).
    pub fn max_vio(&self) -> f64 {
        let total = self.total();
        if total == 0 || self.counts.is_empty() {
            return 0.0;
        }
        let mean = total as f64 / self.counts.len() as f64;
        let max = self.counts.iter().copied().max().unwrap_or(0) as f64;
        (max - mean) / mean
    }
}

/// Statistics over any number of traces.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceStats {
    pub sequences: u64,
    pub tokens: u64,
    /// Tokens whose rows are missing (all layers).
    pub missing_rows: u64,
    /// Largest `num_experts` seen.
    pub num_experts: u32,
    layers: BTreeMap<u32, LayerStats>,
}

impl TraceStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one trace.
    pub fn add(&mut self, t: &RouteTrace) {
        self.sequences += 1;
        self.tokens += t.num_tokens() as u64;
        self.missing_rows += t.num_missing() as u64;
        let e = t.meta().num_experts as usize;
        self.num_experts = self.num_experts.max(e as u32);
        for (li, &layer) in t.layers().iter().enumerate() {
            let s = self.layers.entry(layer).or_insert_with(|| LayerStats { layer, counts: Vec::new() });
            if s.counts.len() < e {
                s.counts.resize(e, 0);
            }
            for tok in 0..t.num_tokens() {
                if let Some(row) = t.row(tok, li) {
                    for &id in row {
                        s.counts[id as usize] += 1;
                    }
                }
            }
        }
        let ne = self.num_experts as usize;
        for s in self.layers.values_mut() {
            s.counts.resize(ne.max(s.counts.len()), 0);
        }
    }

    /// Per-layer statistics, ascending by layer id.
    pub fn layers(&self) -> impl Iterator<Item = &LayerStats> {
        self.layers.values()
    }

    /// Largest `max_vio` over layers.
    pub fn max_vio_max(&self) -> f64 {
        self.layers.values().map(|l| l.max_vio()).fold(0.0, f64::max)
    }

    /// Mean `max_vio` over layers.
    pub fn max_vio_mean(&self) -> f64 {
        if self.layers.is_empty() {
            return 0.0;
        }
        self.layers.values().map(|l| l.max_vio()).sum::<f64>() / self.layers.len() as f64
    }
}
