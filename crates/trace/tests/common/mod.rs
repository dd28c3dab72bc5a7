//! Shared helpers for the integration tests.
#![allow(dead_code)]

use lockstep_trace::{ProbDtype, Probs, RouteTrace, TraceMeta};

/// Deterministic xorshift.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Distinct ids per row, in random (selection) order.
pub fn random_ids(rng: &mut Rng, rows: usize, k: usize, e: u32) -> Vec<u16> {
    let mut out = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let mut row: Vec<u16> = Vec::with_capacity(k);
        while row.len() < k {
            let id = rng.below(e as u64) as u16;
            if !row.contains(&id) {
                row.push(id);
            }
        }
        out.extend(row);
    }
    out
}

pub struct Spec {
    pub tokens: usize,
    pub layers: Vec<u32>,
    pub k: u32,
    pub e: u32,
    pub ordered: bool,
    pub probs: Option<ProbDtype>,
    pub missing: Vec<usize>,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec { tokens: 9, layers: vec![1, 3, 4], k: 4, e: 16, ordered: true, probs: None, missing: vec![], seed: 1 }
    }
}

pub fn make(s: &Spec) -> RouteTrace {
    let mut rng = Rng(s.seed | 1);
    let rows = s.tokens * s.layers.len();
    let ids = random_ids(&mut rng, rows, s.k as usize, s.e);
    let probs = s.probs.map(|dt| {
        let v: Vec<f32> = (0..ids.len()).map(|_| (rng.below(1 << 20) as f32) / (1 << 20) as f32).collect();
        Probs::from_f32(dt, &v)
    });
    let missing = (0..s.tokens).map(|t| s.missing.contains(&t)).collect();
    let meta = TraceMeta { num_experts: s.e, top_k: s.k, prompt_len: (s.tokens / 3) as u32, fingerprint: 0xfeed_beef, policy_version: 42, ordered: s.ordered };
    RouteTrace::new(meta, s.layers.clone(), s.tokens, ids, missing, probs).expect("valid trace")
}

/// A variable-count (expert-choice) trace.
pub fn make_variable(tokens: usize, layers: usize, e: u32, seed: u64, missing: &[usize]) -> RouteTrace {
    let mut rng = Rng(seed | 1);
    let mut counts = Vec::new();
    let mut ids = Vec::new();
    for t in 0..tokens {
        for _ in 0..layers {
            let c = if missing.contains(&t) { 0 } else { rng.below(5) as usize };
            counts.push(c as u32);
            ids.extend(random_ids(&mut rng, 1, c, e));
        }
    }
    let meta = TraceMeta { num_experts: e, top_k: 0, prompt_len: 0, fingerprint: 1, policy_version: 2, ordered: true };
    let miss = (0..tokens).map(|t| missing.contains(&t)).collect();
    RouteTrace::new_variable(meta, (0..layers as u32).collect(), tokens, &counts, ids, miss, None).expect("variable trace")
}
