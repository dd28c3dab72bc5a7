//! Sampling from one row of logits: greedy (temperature 0) or temperature, then top-k, then
//! top-p (nucleus) filtering, drawn with the request's own seeded RNG (ChaCha8), so a request's
//! tokens do not depend on what else is in the batch. Log-probabilities reported with a sampled
//! token are those of the distribution at the request's temperature, log-softmax(logits / T)
//! (T = 1 for greedy requests), before top-k / top-p filtering: the policy the trainer scores
//! (`lockstep_model::logprobs::at_temperature`, the same division on both sides).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// How an engine draws temperature samples; chosen once, with the engine
/// ([`crate::Engine::new`] picks by the model's device, [`crate::Engine::set_sampler`]
/// overrides). Both draw from softmax(logits / T) with a stream fixed by the request's seed
/// alone, so a request's tokens never depend on the batch; they are different streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// On the host ([`sample`]): the candidates sorted by weight, top-k / top-p, the inverse CDF
    /// in f64 with the request's ChaCha8 RNG. The logits rows travel to the host. The CPU default.
    Exact,
    /// Gumbel-max on the logits' device (`lockstep_model::gumbel`: a counter-based hash of the
    /// seed and the token's position), only the tokens come back. The CUDA default. Requests
    /// with top-k or top-p still take the exact host path.
    Gumbel,
}

impl Sampler {
    pub fn for_device(dev: &candle_core::Device) -> Self {
        if dev.is_cpu() { Sampler::Exact } else { Sampler::Gumbel }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exact" => Some(Sampler::Exact),
            "gumbel" => Some(Sampler::Gumbel),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy
    pub temperature: f32,
    /// keep the k most likely tokens (0 = all)
    pub top_k: usize,
    /// keep the smallest set with probability mass ≥ top_p (1 = all)
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// report the `logprobs` most likely tokens (and their log-probabilities at the temperature)
    /// at every sampled position (0 = none)
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0, max_tokens: 16, stop_token_ids: Vec::new(), logprobs: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be > 0");
        }
        Ok(())
    }
}

/// The `n` most likely entries of a log-probability row, most likely first (ties: lower id
/// first).
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut all: Vec<(u32, f32)> = logprobs.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, cmp);
        all.truncate(n);
    }
    all.sort_by(cmp);
    all
}

/// Pick the next token from `logits` (one row, f32).
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |a, (i, &x)| if x > a.1 { (i, x) } else { a }).0 as u32;
    if p.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let mut cand: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &x)| (i as u32, ((x as f64 - max) / p.temperature as f64).exp())).collect();
    // by weight descending, ties by id ascending: the one order (a stable radix sort)
    sort_desc(&mut cand);
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.truncate(p.top_k);
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.1 / total;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    let mut u = rng.random::<f64>() * total;
    for c in &cand {
        if u < c.1 {
            return c.0;
        }
        u -= c.1;
    }
    cand.last().map(|c| c.0).unwrap_or_else(argmax)
}

/// Rows shorter than this sort by comparison (`sort_desc`).
const RADIX_MIN: usize = 1 << 12;

/// Sort (id, weight) pairs by weight descending, equal weights keeping their order (ids
/// ascending as built): a stable LSD radix sort on the weights' bits (finite weights >= 0, whose
/// bit patterns order as the numbers do) — the order `sort_by(weight desc, id asc)` gives, at a
/// fraction of the cost over a 151,936-token vocabulary. Below `RADIX_MIN` entries that stable
/// comparison sort itself: the radix passes' 65,536-bucket counts would cost more than the row
/// (a 256-token vocabulary: ~0.1 ms a row, 35% of a 64-request CPU decode step in `perf`).
fn sort_desc(v: &mut Vec<(u32, f64)>) {
    if v.len() < RADIX_MIN {
        // stable: equal weights keep their (ascending id) order
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        return;
    }
    let key = |w: f64| u64::MAX - w.to_bits();
    let mut src = std::mem::take(v);
    let mut dst = Vec::with_capacity(src.len());
    for pass in 0..4 {
        let shift = pass * 16;
        let mut count = vec![0usize; 1 << 16];
        for c in &src {
            count[((key(c.1) >> shift) & 0xffff) as usize] += 1;
        }
        if count.contains(&src.len()) {
            continue; // every key shares these bits: the pass would not move anything
        }
        let mut at = 0;
        for n in count.iter_mut() {
            let here = *n;
            *n = at;
            at += here;
        }
        dst.clear();
        dst.resize(src.len(), (0, 0.0));
        for c in &src {
            let b = ((key(c.1) >> shift) & 0xffff) as usize;
            dst[count[b]] = *c;
            count[b] += 1;
        }
        std::mem::swap(&mut src, &mut dst);
    }
    *v = src;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_order_is_the_comparison_order() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64_for_test(5);
        for n in [1usize, 2, 17, 1000, RADIX_MIN - 1, RADIX_MIN, 70_000] {
            let v: Vec<(u32, f64)> = (0..n as u32).map(|i| (i, if i % 7 == 0 { 0.25 } else if i % 11 == 0 { 0.0 } else { rng.random::<f64>() * 3.0 })).collect();
            let mut want = v.clone();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut got = v;
            sort_desc(&mut got);
            assert_eq!(got, want, "n {n}");
        }
    }

    trait Seeded {
        fn seed_from_u64_for_test(s: u64) -> Self;
    }
    impl Seeded for rand_chacha::ChaCha8Rng {
        fn seed_from_u64_for_test(s: u64) -> Self {
            <Self as rand::SeedableRng>::seed_from_u64(s)
        }
    }
}
