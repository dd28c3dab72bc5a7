//! The lockstep check: generate with the engine, re-score the same token sequences the
//! trainer's way (one packed forward over prompt + completion, token log-probabilities from
//! `lockstep_model::logprobs`, free routes), and compare log-probabilities and routes.

use lockstep_model::logprobs::token_logprobs;
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};

use crate::engine::{forward_trace, route_width, Completion};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct ConsistencyReport {
    pub sequences: usize,
    pub completion_tokens: usize,
    /// max |log π_engine − log π_trainer| over completion tokens
    pub max_abs_logprob_diff: f64,
    /// mean over completion tokens of ρ − 1 − log ρ, ρ = π_trainer / π_engine
    pub kl_estimate: f64,
    /// share of (token, layer) route rows with identical ids (in order)
    pub route_agreement: f64,
    /// route rows whose router probabilities differ in any bit
    pub prob_rows_differing: usize,
}

pub fn rescore(model: &MoeCausalLm, completions: &[Completion]) -> Result<ConsistencyReport> {
    let mut tokens = Vec::new();
    let mut cu = vec![0usize];
    for c in completions {
        tokens.extend_from_slice(&c.prompt);
        tokens.extend_from_slice(&c.tokens);
        cu.push(tokens.len());
    }
    let batch = Batch::packed(&tokens, None, &cu, model.device())?;
    let out = model.forward(&batch, &RoutingPlan::record())?;
    let (logp, _) = token_logprobs(&out.logits, &batch)?;
    let logp: Vec<f32> = logp.flatten_all()?.to_vec1()?;
    let (mut max_d, mut kl, mut n) = (0f64, 0f64, 0usize);
    let (mut rows, mut same_rows, mut prob_diff) = (0usize, 0usize, 0usize);
    // the trainer's routes in the route trace's layout, as the engine sends them
    let k = route_width(model);
    let trainer = forward_trace(&out.routes, k, model.cfg.moe.router.num_experts)?;
    for (i, c) in completions.iter().enumerate() {
        let start = cu[i];
        for (j, &lp_engine) in c.logprobs.iter().enumerate() {
            let lp_train = logp[start + c.prompt.len() + j];
            let d = (lp_train as f64) - (lp_engine as f64);
            max_d = max_d.max(d.abs());
            kl += d.exp() - 1.0 - d;
            n += 1;
        }
        let len = c.prompt.len() + c.tokens.len();
        let Some(tr) = &trainer else { continue };
        for (li, &l) in tr.layers().iter().enumerate() {
            // the engine's trace, the same layer (by decoder index)
            let eng = c.routes.as_ref().and_then(|r| r.layers().iter().position(|&x| x == l).map(|j| (r, j)));
            for t in 0..len {
                rows += 1;
                let Some((r, j)) = eng else { continue };
                same_rows += usize::from(r.row(t, j) == tr.row(start + t, li));
                let bits = |p: Option<Vec<f32>>| p.map(|p| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                prob_diff += usize::from(bits(r.row_probs(t, j)) != bits(tr.row_probs(start + t, li)));
            }
        }
    }
    Ok(ConsistencyReport {
        sequences: completions.len(),
        completion_tokens: n,
        max_abs_logprob_diff: max_d,
        kl_estimate: if n > 0 { kl / n as f64 } else { 0.0 },
        route_agreement: if rows > 0 { same_rows as f64 / rows as f64 } else { 1.0 },
        prob_rows_differing: prob_diff,
    })
}
