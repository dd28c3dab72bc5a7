//! Token log-probabilities from the shared forward, aligned to tokens:
//! `logp[n] = log_softmax(logits[n − 1])[token[n]]` for every slot n whose previous slot is in
//! the same sequence; `valid[n]` is false for the first token of each sequence and for padding.
//! (The same alignment as inference logprobs: the logprob of the token *at* n.)
//!
//! Temperature: the engine samples from softmax(logits / T) and records log-softmax(logits / T);
//! the trainer scores the same way. [`at_temperature`] is the one place both sides divide, so
//! equal logits give equal bits at any T.

use candle_core::{DType, Tensor};
use crate::batch::Batch;
use crate::error::Result;

/// `logits / T` in f32 (T = 1: the logits in f32 unchanged). The distribution the engine
/// samples from and both sides score (T > 0; greedy decoding records T = 1).
pub fn at_temperature(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    let l = logits.to_dtype(DType::F32)?;
    if temperature == 1.0 || temperature <= 0.0 {
        Ok(l)
    } else {
        Ok((l / temperature)?)
    }
}

/// Per position p of the flattened [B, T] slots: the token it predicts (the token at p + 1 in
/// the same sequence, else 0) and whether it has one; per slot n: whether it is predicted
/// (`valid[n]`: its previous slot lies in the same sequence).
pub fn next_token_targets(batch: &Batch) -> Result<(Vec<u32>, Vec<bool>, Vec<bool>)> {
    let (b, t) = batch.dims();
    let ids: Vec<u32> = batch.input_ids_BT.flatten_all()?.to_vec1()?;
    let seg = batch.segments();
    let (mut target, mut has, mut valid) = (vec![0u32; b * t], vec![false; b * t], vec![false; b * t]);
    for r in 0..b {
        for p in 0..t.saturating_sub(1) {
            let (i, j) = (r * t + p, r * t + p + 1);
            if seg[i] != 0 && seg[i] == seg[j] {
                target[i] = ids[j];
                has[i] = true;
                valid[j] = true;
            }
        }
    }
    Ok((target, has, valid))
}

/// [B, T] log-probabilities (0 where invalid) and the per-slot validity: the values by
/// [`crate::head_grad::token_stats`] (the op the engine records its log-probabilities with, so a
/// re-score equals them bit for bit), with the gradient of the fused log-probability op when the
/// logits carry a graph (`value + (s − s.detach())`: the same value, s's gradient).
pub fn token_logprobs(logits_BTV: &Tensor, batch: &Batch) -> Result<(Tensor, Vec<bool>)> {
    let (b, t) = batch.dims();
    let v = logits_BTV.dim(2)?;
    let dev = logits_BTV.device();
    let (target, _, valid) = next_token_targets(batch)?;
    let flat_NV = logits_BTV.reshape((b * t, v))?;
    let target_N = Tensor::from_vec(target.clone(), b * t, dev)?;
    let stats_N3 = crate::head_grad::token_stats(&flat_NV.to_dtype(DType::F32)?, &target_N, 1.0)?;
    let mut pred_N = stats_N3.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
    if logits_BTV.track_op() {
        let s = crate::head_grad::logprob_entropy_surrogate(&flat_NV, &target, &Tensor::ones(b * t, DType::F32, dev)?, None, 1.0)?;
        pred_N = (pred_N + (&s - s.detach())?)?;
    }
    let pred_BT = pred_N.reshape((b, t))?;
    // shift right by one: slot n takes the prediction made at n − 1
    let zeros = Tensor::zeros((b, 1), DType::F32, dev)?;
    let shifted = if t == 1 { zeros } else { Tensor::cat(&[&zeros, &pred_BT.narrow(1, 0, t - 1)?], 1)? };
    let mask = Tensor::from_vec(valid.iter().map(|&v| u8::from(v)).collect::<Vec<u8>>(), (b, t), dev)?;
    let logp = mask.where_cond(&shifted, &shifted.zeros_like()?)?;
    Ok((logp, valid))
}
