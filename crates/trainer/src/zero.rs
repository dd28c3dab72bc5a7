//! Sharded optimizer state over the data-parallel ranks (ZeRO-1 style, `shard_optimizer`):
//! every rank keeps the replicated parameters whole (attention, norms, routers, embeddings, LM
//! head, shared experts) but only a 1/W slice of their optimizer state — the f32 master copy of
//! a bf16 parameter and the AdamW moments. The experts are sharded by expert parallelism
//! already; their state stays the rank's own, as without this option.
//!
//! **Slicing.** Each replicated parameter of n elements is flattened and zero-padded to
//! W·C elements, C = ⌈n / W⌉; rank r owns elements r·C .. (r+1)·C ([`Slicing`]). Per
//! parameter rather than whole parameters assigned to ranks: every rank holds ⌈n / W⌉ of every
//! parameter, so the state is balanced to within W elements per parameter whatever the sizes
//! (an embedding table next to a norm), and every rank takes part in every collective alike.
//! The padding holds zeros, which the update keeps at zero (m = v = 0, θ = 0).
//!
//! **A step** (every rank, the same parameters in the same order):
//! 1. each replicated gradient (this rank's sum over its micro-batches, f32) is padded and
//!    reduce-scattered (`Collective::reduce_scatter_sum`: rank r receives the rank-ordered sum
//!    of its slice) and the whole gradient is dropped;
//! 2. the global gradient norm: each rank's Σ g² over its slices and its expert shards, summed
//!    over the ranks in rank order — every rank gets the same number and clips by the same
//!    factor;
//! 3. a non-finite loss or norm skips the update as in [`crate::trainer::Trainer::step`];
//! 4. each rank updates its slices with the same element-wise AdamW as the unsharded path
//!    ([`StepHyper::update`]: schedule, weight decay, bias correction, clipping), casts each to
//!    the parameter's dtype and all-gathers it into the whole parameter on every rank — so the
//!    replicated weights stay bitwise identical across the ranks. The experts update as before.
//!
//! Against W ranks without sharding, the update of every element is the same computation on
//! the same numbers (the thread group's reduce-scatter adds in the all-reduce's rank order);
//! only the gradient norm is summed in another order, so without clipping the weights are
//! bitwise the same, with clipping within rounding of the clip factor.
//!
//! Checkpoints stay ordinary ones (see [`crate::checkpoint`]): the slices are all-gathered one
//! parameter at a time and rank 0 writes whole moments; a resume slices them again for any
//! rank count, sharded or not.
//!
//! Legend: W ranks, r this rank, n elements of a parameter, C = ⌈n / W⌉.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Result, TrainError};
use crate::optim::{grad_sq_sum, AdamW, GradAccumulator, StepStats};
use crate::parallel::{sum_over_ranks, DataParallel};

/// The flat slicing of one parameter over the ranks ([module doc](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slicing {
    /// n, the parameter's elements
    pub elems: usize,
    /// W
    pub world: usize,
}

impl Slicing {
    pub fn new(elems: usize, world: usize) -> Result<Self> {
        if world == 0 {
            return Err(TrainError::input("<ranks>", "world_size must be > 0"));
        }
        Ok(Self { elems, world })
    }

    /// C = ⌈n / W⌉, the elements each rank owns (padding included).
    pub fn chunk(&self) -> usize {
        self.elems.div_ceil(self.world)
    }

    /// W·C.
    pub fn padded(&self) -> usize {
        self.chunk() * self.world
    }

    /// The real (not padding) elements rank `rank` owns.
    pub fn owned(&self, rank: usize) -> usize {
        self.elems.saturating_sub(rank * self.chunk()).min(self.chunk())
    }

    /// `whole` flattened and zero-padded to [W·C].
    pub fn pad_flat(&self, whole: &Tensor) -> Result<Tensor> {
        self.check(whole)?;
        let flat_n = whole.flatten_all()?;
        let pad = self.padded() - self.elems;
        if pad == 0 {
            return Ok(flat_n);
        }
        let zeros = Tensor::zeros(pad, whole.dtype(), whole.device())?;
        Ok(Tensor::cat(&[&flat_n, &zeros], 0)?)
    }

    /// Rank `rank`'s slice [C] of `whole` (zero-padded), in fresh memory (it does not keep
    /// `whole` alive).
    pub fn slice(&self, whole: &Tensor, rank: usize) -> Result<Tensor> {
        self.check(whole)?;
        let (c, real) = (self.chunk(), self.owned(rank));
        let zeros = |k: usize| Tensor::zeros(k, whole.dtype(), whole.device());
        if real == 0 {
            return Ok(zeros(c)?);
        }
        let head_c = whole.flatten_all()?.narrow(0, rank * c, real)?;
        Ok(if real == c { head_c.copy()? } else { Tensor::cat(&[&head_c, &zeros(c - real)?], 0)? })
    }

    /// The whole tensor of shape `dims` from every rank's slice [C] (an all-gather; a
    /// collective).
    pub fn gather(&self, dp: &dyn DataParallel, slice_c: &Tensor, dims: &[usize]) -> Result<Tensor> {
        if slice_c.dims() != [self.chunk()] {
            return Err(TrainError::input("<optimizer slice>", format!("shape {:?}, [{}] expected", slice_c.dims(), self.chunk())));
        }
        let all = dp.all_gather_rows(slice_c)?;
        Ok(all.narrow(0, 0, self.elems)?.reshape(dims)?)
    }

    fn check(&self, whole: &Tensor) -> Result<()> {
        if whole.elem_count() != self.elems {
            return Err(TrainError::input("<optimizer slice>", format!("{} elements, {} expected", whole.elem_count(), self.elems)));
        }
        Ok(())
    }
}

/// This rank's slices of the replicated parameters' optimizer state, by parameter name: each
/// [C] f32 ([module doc](self)).
#[derive(Debug, Clone, Default)]
pub struct ZeroState {
    pub world: usize,
    pub rank: usize,
    /// f32 master slices of the parameters held in bf16 (none for f32 parameters: the
    /// parameter itself is the master, whole on every rank)
    pub master: HashMap<String, Tensor>,
    /// first / second moment slices (none before a parameter's first update)
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

/// Whether a parameter's state is sliced: every parameter `dp` does not shard by experts.
pub fn is_replicated(dp: &dyn DataParallel, name: &str) -> bool {
    !dp.is_sharded(name)
}

impl ZeroState {
    /// Move the replicated parameters' whole state out of `opt` into this rank's slices
    /// (experts' state stays in `opt`).
    pub fn take_from(opt: &mut AdamW, params: &[(String, Var)], dp: &dyn DataParallel) -> Result<Self> {
        let (world, rank) = (dp.world_size(), dp.rank());
        let mut z = Self { world, rank, ..Self::default() };
        for (name, var) in params.iter().filter(|(n, _)| is_replicated(dp, n)) {
            let s = Slicing::new(var.elem_count(), world)?;
            for (from, to) in [(&mut opt.master, &mut z.master), (&mut opt.m, &mut z.m), (&mut opt.v, &mut z.v)] {
                if let Some(whole) = from.remove(name) {
                    to.insert(name.clone(), s.slice(&whole.to_dtype(DType::F32)?, rank)?);
                }
            }
        }
        Ok(z)
    }

    /// Elements held in the slices (master, m and v together).
    pub fn elements(&self) -> usize {
        [&self.master, &self.m, &self.v].iter().flat_map(|m| m.values()).map(Tensor::elem_count).sum()
    }

    /// A replicated parameter's whole moment (`v = false`: m; true: v) from the ranks' slices,
    /// zeros where it has none yet (a collective).
    pub fn gather_moment(&self, dp: &dyn DataParallel, name: &str, var: &Var, second: bool) -> Result<Tensor> {
        let s = Slicing::new(var.elem_count(), self.world)?;
        let map = if second { &self.v } else { &self.m };
        let slice_c = match map.get(name) {
            Some(t) => t.clone(),
            None => Tensor::zeros(s.chunk(), DType::F32, var.device())?,
        };
        s.gather(dp, &slice_c, var.dims())
    }

    /// The whole f32 master copies of the bf16 replicated parameters (a collective, one
    /// parameter at a time).
    pub fn gather_masters(&self, dp: &dyn DataParallel, params: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var) in params {
            if let Some(slice_c) = self.master.get(name) {
                let s = Slicing::new(var.elem_count(), self.world)?;
                out.insert(name.clone(), s.gather(dp, slice_c, var.dims())?);
            }
        }
        Ok(out)
    }
}

/// Reduce-scatter the replicated gradients, reduce the global norm, and (when the global loss
/// and the norm are finite) update: this rank's slices, all-gathered into the parameters, and
/// its experts as before. Returns the norm and, unless skipped, the step's statistics. A
/// collective ([module doc](self)).
pub fn step(opt: &mut AdamW, zero: &mut ZeroState, dp: &dyn DataParallel, params: &[(String, Var)], acc: &mut GradAccumulator, global_loss: f64)
    -> Result<(f64, Option<StepStats>)> {
    let (world, rank) = (dp.world_size(), dp.rank());
    if (zero.world, zero.rank) != (world, rank) {
        return Err(TrainError::input("<ranks>", format!("optimizer slices of rank {} of {}, trainer on rank {rank} of {world}", zero.rank, zero.world)));
    }
    let replicated = || params.iter().filter(|(n, _)| is_replicated(dp, n));
    let mut sliced = GradAccumulator::default();
    for (name, var) in replicated() {
        let s = Slicing::new(var.elem_count(), world)?;
        // a parameter without a gradient here contributes zeros (another rank may have one)
        let g = match acc.remove(name) {
            Some(g) => g,
            None => Tensor::zeros(var.shape(), DType::F32, var.device())?,
        };
        let g_c = dp.reduce_scatter_sum(&s.pad_flat(&g)?)?;
        sliced.set(name, g_c);
    }
    let names = || params.iter().map(|(n, _)| n.as_str());
    let local_sq = grad_sq_sum(names().filter(|n| is_replicated(dp, n)), &sliced)? + grad_sq_sum(names().filter(|n| !is_replicated(dp, n)), acc)?;
    let norm = sum_over_ranks(dp, &[local_sq])?[0].sqrt();
    if !(global_loss.is_finite() && norm.is_finite()) {
        return Ok((norm, None));
    }
    let h = opt.begin_step(norm);
    for (name, var) in params {
        if !is_replicated(dp, name) {
            if let Some(g) = acc.get(name) {
                let g = g.clone();
                opt.update_param(name, var, &g, &h)?;
            }
            continue;
        }
        let s = Slicing::new(var.elem_count(), world)?;
        let g_c = sliced.remove(name).ok_or_else(|| TrainError::input("<optimizer slice>", format!("`{name}`: no reduced gradient")))?;
        // the master slice, updated in place, or a fresh f32 copy of this rank's slice
        let theta_c = match zero.master.get(name) {
            Some(w) => w.clone(),
            None => s.slice(&var.as_tensor().detach(), rank)?.to_dtype(DType::F32)?.copy()?,
        };
        let (m_c, v_c) = h.apply(&theta_c, &g_c, zero.m.remove(name), zero.v.remove(name))?;
        let whole = s.gather(dp, &theta_c.to_dtype(var.dtype())?, var.dims())?;
        var.set(&whole)?;
        zero.m.insert(name.clone(), m_c);
        zero.v.insert(name.clone(), v_c);
    }
    Ok((norm, Some(StepStats { grad_norm: norm, lr: h.lr })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn slicing_pads_and_splits() {
        let s = Slicing::new(10, 4).unwrap();
        assert_eq!((s.chunk(), s.padded()), (3, 12));
        assert_eq!((0..4).map(|r| s.owned(r)).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        let t = Tensor::arange(0f32, 10., &Device::Cpu).unwrap().reshape((2, 5)).unwrap();
        let all: Vec<Vec<f32>> = (0..4).map(|r| s.slice(&t, r).unwrap().to_vec1().unwrap()).collect();
        assert_eq!(all, vec![vec![0., 1., 2.], vec![3., 4., 5.], vec![6., 7., 8.], vec![9., 0., 0.]]);
        assert_eq!(s.pad_flat(&t).unwrap().to_vec1::<f32>().unwrap()[9..], [9., 0., 0.]);
        // more ranks than elements: the last ranks own padding only
        let tiny = Slicing::new(2, 4).unwrap();
        assert_eq!((tiny.chunk(), tiny.owned(3)), (1, 0));
        assert!(Slicing::new(3, 0).is_err());
        assert!(s.slice(&Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(), 0).is_err());
    }
}
