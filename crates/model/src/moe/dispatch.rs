//! Dispatch stage: turn a routing decision into flat assignments grouped by expert.
//!
//! An assignment is (token, expert, weight). Token-choice gives N·K of them (K per token);
//! expert-choice gives a variable number per token. Assignments are ordered by expert, then by
//! token, so each expert sees one contiguous slice and the combine stage adds each token's
//! contributions in ascending expert order (the order transformers' expert loop uses).
//!
//! Legend: N tokens, E experts, A assignments.

use candle_core::{Device, Result, Tensor};


/// Flat assignments sorted by expert.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// [A] u32 token row of each assignment
    pub token_A: Tensor,
    /// [A] weight of each assignment (gradient flows to the router through it)
    pub weight_A: Tensor,
    /// assignments per expert; expert e owns rows offsets[e]..offsets[e] + counts[e]
    pub counts: Vec<usize>,
}

impl Dispatch {
    /// Group a layer's assignments, given as host (token, expert) pairs and their weights
    /// `weight_A` (same order), by expert (stable: ties keep the decision's order).
    pub fn from_pairs(tokens: &[u32], experts: &[u32], weight_A: &Tensor, num_experts: usize, device: &Device) -> Result<Self> {
        let mut counts = vec![0usize; num_experts];
        for &e in experts {
            counts[e as usize] += 1;
        }
        let mut next: Vec<usize> = counts
            .iter()
            .scan(0usize, |acc, &c| {
                let start = *acc;
                *acc += c;
                Some(start)
            })
            .collect();
        // stable counting sort of the assignments by expert
        let mut order = vec![0u32; experts.len()];
        let mut token = vec![0u32; experts.len()];
        for (a, &e) in experts.iter().enumerate() {
            let dst = next[e as usize];
            next[e as usize] += 1;
            order[dst] = a as u32;
            token[dst] = tokens[a];
        }
        let n = order.len();
        let order_A = Tensor::from_vec(order, n, device)?;
        let weight_A = weight_A.index_select(&order_A, 0)?;
        let token_A = Tensor::from_vec(token, n, device)?;
        Ok(Self { token_A, weight_A, counts })
    }

    /// Token rows of x in assignment order: [A, D].
    pub fn gather(&self, x_ND: &Tensor) -> Result<Tensor> {
        x_ND.index_select(&self.token_A, 0)
    }
}
