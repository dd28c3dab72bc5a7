//! The one seam between ranks: [`Collective`], what expert parallelism (the experts stage across
//! ranks) and data parallelism (the trainer's sums over ranks) need from a process group, and
//! [`CollectiveError`], whose [`CollectiveError::Aborted`] tells a rank that stopped because
//! another rank failed from the rank that failed.
//!
//! It stands at the bottom of the workspace (candle-core and thiserror only), so the model (its
//! error type), the trainer (`lockstep_trainer::parallel::DataParallel` extends the trait) and
//! `lockstep-dist` (which implements it: NCCL across GPUs, threads in one process) all use this
//! one trait.
//!
//! Every rank calls the collectives in the same order (the forward and the backward visit the
//! MoE layers in the same order on every rank); results are identical on every rank wherever
//! they are meant to be (sums in rank order).

mod error;

use candle_core::Tensor;

pub use error::{CollectiveError, Result};

pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `send` [S, ...]: its first `send_rows[0]` rows go to rank 0, the next `send_rows[1]` to
    /// rank 1, ...; returns the rows every rank sent here, in rank order (`recv_rows[w]` from
    /// rank w). The data is not part of any autograd graph (`lockstep_dist::ep`'s all-to-all op
    /// adds the backward).
    fn all_to_all_rows(&self, send: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> Result<Tensor>;
    /// `counts`: W blocks of B values (B = len / W, the same on every rank), block w for rank w
    /// (e.g. the rows this rank sends rank w, per expert of rank w); returns W blocks of B, block
    /// w the one rank w sent here.
    fn exchange_counts(&self, counts: &[usize]) -> Result<Vec<usize>>;
    /// Element-wise sum over ranks (the same tensor on every rank).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `values`, in rank order.
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<Vec<f64>>>;
    /// Every rank's `t` (the same shape on every rank) stacked along dim 0 in rank order:
    /// one all-to-all that sends the whole tensor to every rank.
    fn all_gather_rows(&self, t: &Tensor) -> Result<Tensor> {
        let (w, n) = (self.world_size(), t.dim(0)?);
        let send = Tensor::cat(&vec![t.detach(); w], 0)?;
        self.all_to_all_rows(&send, &vec![n; w], &vec![n; w])
    }
    /// Element-wise sum over the ranks of `t` [W·C, ...] (the same shape on every rank),
    /// scattered: rank r receives rows r·C .. (r+1)·C of the sum, the ranks' blocks added in
    /// rank order (as the thread group's `all_reduce_sum` adds them, so the two agree bitwise
    /// there). Default: one `all_to_all_rows` (block w to rank w) and a local sum.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let (w, n) = (self.world_size(), t.dim(0)?);
        if w == 0 || n % w != 0 {
            return Err(CollectiveError::Mismatch(format!("reduce_scatter_sum: {n} rows are not {w} equal blocks (one per rank)")));
        }
        let c = n / w;
        let got = self.all_to_all_rows(&t.detach(), &vec![c; w], &vec![c; w])?;
        let mut acc = got.narrow(0, 0, c)?;
        for k in 1..w {
            acc = (acc + got.narrow(0, k * c, c)?)?;
        }
        Ok(acc.contiguous()?)
    }
    /// Whether `all_to_all_cuda` works (then the EP all-to-all op exchanges inside its CUDA
    /// forward, into fresh memory; else it uses `all_to_all_rows`).
    fn exchanges_cuda_storage(&self) -> bool {
        false
    }
    /// `all_to_all_rows` straight between CUDA storages, for an input of `layout`.
    fn all_to_all_cuda(&self, _send: &candle_core::CudaStorage, _layout: &candle_core::Layout, _send_rows: &[usize], _recv_rows: &[usize])
        -> Result<candle_core::CudaStorage> {
        Err(CollectiveError::Unsupported("this collective does not exchange CUDA storages".into()))
    }
}

/// Element-wise sums of every rank's values (added in rank order: the same on every rank).
pub fn sum_over_ranks<C: Collective + ?Sized>(comm: &C, values: &[f64]) -> Result<Vec<f64>> {
    let all = comm.all_gather_host(values)?;
    let mut sum = vec![0f64; values.len()];
    for r in &all {
        if r.len() != values.len() {
            return Err(CollectiveError::Mismatch(format!("<ranks>: a rank sent {} values, {} expected", r.len(), values.len())));
        }
        for (s, x) in sum.iter_mut().zip(r) {
            *s += x;
        }
    }
    Ok(sum)
}

/// Row offsets of consecutive blocks.
pub fn offsets(rows: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    rows.iter()
        .map(|&r| {
            let o = acc;
            acc += r;
            o
        })
        .collect()
}
