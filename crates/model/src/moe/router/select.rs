//! Selection of the route from router scores, as candle ops that run where the scores live:
//! the host code here defines the semantics; on CUDA the same selection runs in
//! `gpu::route` (kernels `route.cu`) and gives the same ids, so a layer routes, records and
//! replays without copying its scores to the host.
//!
//! Order: f32 total order (`f32::total_cmp`), larger first, ties to the lower index.
//!
//! Legend: N tokens, E experts, K experts per token, A assignments.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::config::RouterConfig;

/// Indices of the `k` largest values, descending, ties to the lower index.
pub fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Group-limited top-k over one token's biased scores (see `token_choice`): the `topk_group`
/// best groups (group score = sum of the group's two best values) are kept, every other
/// expert's value becomes −∞ (so no expert of a dropped group can be picked, whatever the sign
/// of the biased scores), then the top K are taken.
pub fn select_row(choice: &[f32], n_group: usize, topk_group: usize, top_k: usize) -> Vec<usize> {
    if n_group <= 1 {
        return top_indices(choice, top_k);
    }
    let per = choice.len() / n_group;
    let group_scores: Vec<f32> = choice
        .chunks(per)
        .map(|g| top_indices(g, 2.min(per)).iter().map(|&i| g[i]).sum())
        .collect();
    let keep = top_indices(&group_scores, topk_group);
    let masked: Vec<f32> = choice
        .iter()
        .enumerate()
        .map(|(i, &s)| if keep.contains(&(i / per)) { s } else { f32::NEG_INFINITY })
        .collect();
    top_indices(&masked, top_k)
}

fn f32_input<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: scores must be f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: scores must be contiguous"),
    }
}

/// choice_NE (f32) → ids_NK (u32): token-choice top-k, group-limited when `n_group > 1`.
#[derive(Debug, Clone, Copy)]
pub struct TopK {
    pub n_group: usize,
    pub topk_group: usize,
    pub k: usize,
}

impl TopK {
    pub fn of(cfg: &RouterConfig) -> Self {
        Self { n_group: cfg.n_group.max(1), topk_group: cfg.topk_group, k: cfg.top_k }
    }

    pub fn apply(&self, choice_NE: &Tensor) -> Result<Tensor> {
        choice_NE.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for TopK {
    fn name(&self) -> &'static str {
        "route-top-k"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, e) = l.shape().dims2()?;
        let v = f32_input(s, l, self.name())?;
        let mut ids = Vec::with_capacity(n * self.k);
        for row in v.chunks(e.max(1)).take(n) {
            ids.extend(select_row(row, self.n_group, self.topk_group, self.k).into_iter().map(|i| i as u32));
        }
        Ok((CpuStorage::U32(ids), Shape::from((n, self.k))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::route::top_k(s, l, self.n_group, self.topk_group, self.k)
    }
}

/// choice_NE (f32) → [2, A] u32 (token slots; experts): every expert takes the top `caps[p]`
/// tokens of each pool `pools[p]` (slots ascending). Ordered by expert, then pool, then the
/// expert's preference.
#[derive(Debug, Clone)]
pub struct ExpertChoice {
    pub pools: Vec<Vec<u32>>,
    pub caps: Vec<usize>,
}

impl ExpertChoice {
    pub fn apply(&self, choice_NE: &Tensor) -> Result<Tensor> {
        choice_NE.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for ExpertChoice {
    fn name(&self) -> &'static str {
        "route-expert-choice"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, e) = l.shape().dims2()?;
        let v = f32_input(s, l, self.name())?;
        let (mut tok, mut exp) = (Vec::new(), Vec::new());
        for ex in 0..e {
            for (p, &c) in self.pools.iter().zip(&self.caps) {
                let mut order = p.clone();
                order.sort_by(|&a, &b| v[b as usize * e + ex].total_cmp(&v[a as usize * e + ex]).then(a.cmp(&b)));
                for &slot in &order[..c] {
                    tok.push(slot);
                    exp.push(ex as u32);
                }
            }
        }
        let a = tok.len();
        tok.extend(exp);
        Ok((CpuStorage::U32(tok), Shape::from((2, a))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::route::expert_choice(s, l, &self.pools, &self.caps)
    }
}
