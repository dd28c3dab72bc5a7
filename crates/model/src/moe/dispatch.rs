//! The host index arithmetic of dispatch, as a leaf module (it imports nothing of this crate):
//! expert histograms, exclusive prefix sums, the stable counting sort by expert, and the
//! ordering rule of rows received from several sources — shared by the dispatch plan's host
//! form (`moe::plan`), the GPU plan (`gpu::plan`) and expert parallelism (`lockstep-dist`).
//!
//! An assignment is (token, expert, weight). Token-choice gives N·K of them (K per token);
//! expert-choice gives a variable number per token. Assignments are ordered by expert, then by
//! token, so each expert sees one contiguous slice and the combine stage adds each token's
//! contributions in ascending expert order (the order transformers' expert loop uses).
//!
//! Legend: N tokens, E experts, A assignments, S sources.

/// Exclusive prefix sum: `starts[i] = Σ_{j < i} counts[j]` (expert e's first row when the rows
/// are grouped by expert with `counts[e]` each) — the one prefix sum of the house, shared with
/// the collectives' block offsets.
pub fn starts(counts: &[usize]) -> Vec<usize> {
    lockstep_collective::offsets(counts)
}

/// Assignments per expert: [E].
pub fn histogram(expert_A: &[u32], num_experts: usize) -> Vec<usize> {
    let mut counts = vec![0usize; num_experts];
    for &e in expert_A {
        counts[e as usize] += 1;
    }
    counts
}

/// The stable counting sort of assignments by expert: `(order, counts)` with `order[r]` the
/// assignment placed at row r (ties keep the decision's order) and `counts[e]` the rows of
/// expert e.
pub fn sort_by_expert(expert_A: &[u32], num_experts: usize) -> (Vec<u32>, Vec<usize>) {
    let counts = histogram(expert_A, num_experts);
    let mut next = starts(&counts);
    let mut order = vec![0u32; expert_A.len()];
    for (a, &e) in expert_A.iter().enumerate() {
        order[next[e as usize]] = a as u32;
        next[e as usize] += 1;
    }
    (order, counts)
}

/// Rows of each expert over all sources (`counts_SE[s · E + e]` → [E]).
pub fn expert_counts(counts_SE: &[usize], num_experts: usize) -> Vec<usize> {
    let mut counts = vec![0usize; num_experts];
    for (i, &c) in counts_SE.iter().enumerate() {
        counts[i % num_experts] += c;
    }
    counts
}

/// The one ordering rule of received rows: rows that arrive grouped by source, each source's
/// rows grouped by expert, regrouped expert-major with the sources in order within an expert.
/// Returns, per arriving row, its row there: `first_E[e]` (expert e's first row) + the rows of
/// e from earlier sources + its index within its block. Shared by the CPU path and the CUDA
/// plan (`gpu::plan::Plan::sorted_rows`, whose padded layout gives other `first_E`).
pub fn expert_major_rows(counts_SE: &[usize], first_E: &[usize]) -> Vec<u32> {
    let mut next = first_E.to_vec();
    let mut pos = Vec::with_capacity(counts_SE.iter().sum());
    for block in counts_SE.chunks(first_E.len().max(1)) {
        for (slot, &c) in next.iter_mut().zip(block) {
            pos.extend((*slot..*slot + c).map(|p| p as u32));
            *slot += c;
        }
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_arithmetic_by_hand() {
        assert_eq!(starts(&[2, 0, 3, 1]), vec![0, 2, 2, 5]);
        assert_eq!(histogram(&[2, 0, 2, 1, 2], 4), vec![1, 1, 3, 0]);
        // stable: expert 2's assignments 0, 2, 4 keep their order
        assert_eq!(sort_by_expert(&[2, 0, 2, 1, 2], 4), (vec![1, 3, 0, 2, 4], vec![1, 1, 3, 0]));
        // two sources of 2 experts: source 0 sends (1 of e0, 2 of e1), source 1 (2 of e0, 0 of e1)
        let counts_SE = [1, 2, 2, 0];
        assert_eq!(expert_counts(&counts_SE, 2), vec![3, 2]);
        assert_eq!(expert_major_rows(&counts_SE, &starts(&[3, 2])), vec![0, 3, 4, 1, 2]);
    }
}
