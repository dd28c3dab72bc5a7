//! A process group of threads in one process: the same collectives as NCCL, through shared
//! memory. Used by the CPU tests (2 ranks == 1 rank), CPU runs (`lockstep train --ranks N`) and
//! thread ranks sharing one GPU (tests; the GPU runs proper are `lockstep launch` over NCCL).
//! A rank that fails aborts the group ([`LocalComm::abort`], done by `ranks::run_threads`): the
//! others' collectives then return [`CollectiveError::Aborted`] naming it instead of waiting
//! for ever.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use candle_core::Tensor;
use lockstep_collective::{offsets, Collective, CollectiveError, Result};

#[derive(Debug)]
struct Shared {
    world: usize,
    barrier: Gate,
    /// slot [from * world + to]
    tensors: Mutex<Vec<Option<Tensor>>>,
    host: Mutex<Vec<Vec<f64>>>,
}

/// One rank of a [`local_group`].
#[derive(Debug, Clone)]
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

/// `world` ranks sharing memory; hand one to each thread.
pub fn local_group(world: usize) -> Vec<LocalComm> {
    let shared = Arc::new(Shared {
        world,
        barrier: Gate::default(),
        tensors: Mutex::new(vec![None; world * world]),
        host: Mutex::new(vec![Vec::new(); world]),
    });
    (0..world).map(|rank| LocalComm { rank, shared: shared.clone() }).collect()
}

/// A barrier that a failed rank can open for good.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    waiting: usize,
    generation: u64,
    /// the first rank that failed, and what it reported
    failed: Option<(usize, String)>,
}

fn aborted((rank, cause): &(usize, String)) -> CollectiveError {
    CollectiveError::Aborted { rank: *rank, cause: cause.clone() }
}

impl Gate {
    fn wait(&self, world: usize) -> Result<()> {
        let mut g = self.state.lock().map_err(|_| CollectiveError::Poisoned)?;
        if let Some(f) = &g.failed {
            return Err(aborted(f));
        }
        let generation = g.generation;
        g.waiting += 1;
        if g.waiting == world {
            g.waiting = 0;
            g.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while g.generation == generation && g.failed.is_none() {
            g = self.cv.wait(g).map_err(|_| CollectiveError::Poisoned)?;
        }
        match &g.failed {
            Some(f) if g.generation == generation => Err(aborted(f)),
            _ => Ok(()),
        }
    }

    fn abort(&self, rank: usize, cause: String) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).failed.get_or_insert((rank, cause));
        self.cv.notify_all();
    }

    fn failed(&self) -> Option<(usize, String)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).failed.clone()
    }
}

impl LocalComm {
    /// Mark this rank failed with `cause`: every rank's pending and later collectives return
    /// [`CollectiveError::Aborted`]. The group keeps the first rank that aborted it.
    pub fn abort(&self, cause: impl Into<String>) {
        self.shared.barrier.abort(self.rank, cause.into());
    }

    /// The first rank that aborted the group, and its cause.
    pub fn failed(&self) -> Option<(usize, String)> {
        self.shared.barrier.failed()
    }

    fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
        m.lock().map_err(|_| CollectiveError::Poisoned)
    }

    /// Post one tensor per destination, wait for everyone, take the ones addressed here.
    ///
    /// On CUDA every thread enqueues on its own stream (candle uses the per-thread default
    /// stream), so a tensor posted by one rank may still be in the making on that rank's stream:
    /// the poster synchronizes its stream before posting, and the taker copies what it took on
    /// its own stream and synchronizes before the closing barrier, after which the poster may
    /// free its memory.
    fn exchange(&self, out: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let w = self.shared.world;
        if let Some(t) = out.first().filter(|t| !t.device().is_cpu()) {
            t.device().synchronize()?;
        }
        {
            let mut slots = Self::lock(&self.shared.tensors)?;
            for (to, t) in out.into_iter().enumerate() {
                slots[self.rank * w + to] = Some(t);
            }
        }
        self.shared.barrier.wait(self.shared.world)?;
        let got = {
            let mut slots = Self::lock(&self.shared.tensors)?;
            (0..w).map(|from| slots[from * w + self.rank].take()).collect::<Option<Vec<_>>>()
        };
        let got = match got {
            Some(got) if got.first().is_some_and(|t| !t.device().is_cpu()) => {
                let own = got.iter().map(|t| t.copy()).collect::<candle_core::Result<Vec<_>>>();
                let synced = got[0].device().synchronize();
                drop(got);
                // the closing barrier comes first even on an error, so no rank is left waiting
                self.shared.barrier.wait(self.shared.world)?;
                synced?;
                return Ok(own?);
            }
            got => got,
        };
        self.shared.barrier.wait(self.shared.world)?;
        got.ok_or_else(|| CollectiveError::Mismatch("local collective: a rank posted nothing".into()))
    }
}

impl Collective for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_to_all_rows(&self, send: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> Result<Tensor> {
        let w = self.shared.world;
        if send_rows.len() != w || recv_rows.len() != w || send_rows.iter().sum::<usize>() != send.dim(0)? {
            return Err(CollectiveError::Mismatch(format!("all_to_all_rows: {} rows to split as {send_rows:?} / receive {recv_rows:?} over {w} ranks", send.dim(0)?)));
        }
        let send = send.detach();
        let blocks = offsets(send_rows).iter().zip(send_rows).map(|(&o, &r)| send.narrow(0, o, r)).collect::<candle_core::Result<Vec<_>>>()?;
        let got = self.exchange(blocks)?;
        for (from, (t, &want)) in got.iter().zip(recv_rows).enumerate() {
            if t.dim(0)? != want {
                return Err(CollectiveError::Mismatch(format!("all_to_all_rows: rank {from} sent {} rows, {want} expected", t.dim(0)?)));
            }
        }
        Ok(Tensor::cat(&got, 0)?.contiguous()?)
    }
    fn exchange_counts(&self, counts: &[usize]) -> Result<Vec<usize>> {
        let w = self.shared.world;
        if counts.is_empty() || counts.len() % w != 0 {
            return Err(CollectiveError::Mismatch(format!("exchange_counts: {} counts are not {w} equal blocks (one per rank)", counts.len())));
        }
        let dev = candle_core::Device::Cpu;
        let out = counts.chunks(counts.len() / w).map(|c| Tensor::from_vec(c.iter().map(|&c| c as u32).collect(), c.len(), &dev)).collect::<candle_core::Result<Vec<_>>>()?;
        let mut got = Vec::with_capacity(counts.len());
        for t in self.exchange(out)? {
            got.extend(t.to_vec1::<u32>()?.into_iter().map(|c| c as usize));
        }
        Ok(got)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.exchange(vec![t.detach(); self.shared.world])?;
        let mut acc = all[0].clone();
        for x in &all[1..] {
            acc = (acc + x)?;
        }
        Ok(acc)
    }
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        Self::lock(&self.shared.host)?[self.rank] = values.to_vec();
        self.shared.barrier.wait(self.shared.world)?;
        let all = Self::lock(&self.shared.host)?.clone();
        self.shared.barrier.wait(self.shared.world)?;
        Ok(all)
    }
}
