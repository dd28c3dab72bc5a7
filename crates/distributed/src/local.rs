//! A process group of threads in one process: the same collectives as NCCL, through shared
//! memory. Used by the CPU tests (2 ranks == 1 rank), CPU runs (`lockstep train --ranks N`) and
//! thread ranks sharing one GPU (tests; the GPU runs proper are `lockstep launch` over NCCL).
//! A rank that fails aborts the group ([`LocalComm::abort`], done by [`run_ranks`]): the
//! others' collectives then return an error naming it instead of waiting for ever.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{Result, Tensor};

use crate::collective::{offsets, Collective};

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
    failed: Option<usize>,
}

impl Gate {
    fn wait(&self, world: usize) -> Result<()> {
        let failed = |r: usize| candle_core::Error::Msg(format!("local collective: rank {r} failed"));
        let mut g = self.state.lock().map_err(|_| candle_core::Error::Msg("local collective: another rank panicked".into()))?;
        if let Some(r) = g.failed {
            return Err(failed(r));
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
            g = self.cv.wait(g).map_err(|_| candle_core::Error::Msg("local collective: another rank panicked".into()))?;
        }
        match g.failed {
            Some(r) if g.generation == generation => Err(failed(r)),
            _ => Ok(()),
        }
    }

    fn abort(&self, rank: usize) {
        if let Ok(mut g) = self.state.lock() {
            g.failed.get_or_insert(rank);
        }
        self.cv.notify_all();
    }
}

/// Run `f` on every rank of a new thread group of `world` ranks; a rank that returns an error
/// (or panics) aborts the group. Results in rank order.
pub fn run_ranks<T: Send, E: Send>(world: usize, f: impl Fn(LocalComm) -> std::result::Result<T, E> + Sync) -> Vec<std::thread::Result<std::result::Result<T, E>>> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = local_group(world)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut guard = AbortOnDrop(Some(c.clone()));
                    let r = f(c);
                    if r.is_ok() {
                        guard.0 = None;
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

/// Aborts its rank's group when dropped: on an error return, or while unwinding from a panic.
struct AbortOnDrop(Option<LocalComm>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.abort();
        }
    }
}

impl LocalComm {
    /// Mark this rank failed: every rank's pending and later collectives return an error.
    pub fn abort(&self) {
        self.shared.barrier.abort(self.rank);
    }

    fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
        m.lock().map_err(|_| candle_core::Error::Msg("local collective: another rank panicked".into()))
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
                let own = got.iter().map(|t| t.copy()).collect::<Result<Vec<_>>>();
                let synced = got[0].device().synchronize();
                drop(got);
                // the closing barrier comes first even on an error, so no rank is left waiting
                self.shared.barrier.wait(self.shared.world)?;
                synced?;
                return own;
            }
            got => got,
        };
        self.shared.barrier.wait(self.shared.world)?;
        got.ok_or_else(|| candle_core::Error::Msg("local collective: a rank posted nothing".into()))
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
            candle_core::bail!("all_to_all_rows: {} rows to split as {send_rows:?} / receive {recv_rows:?} over {w} ranks", send.dim(0)?);
        }
        let send = send.detach();
        let blocks = offsets(send_rows).iter().zip(send_rows).map(|(&o, &r)| send.narrow(0, o, r)).collect::<Result<Vec<_>>>()?;
        let got = self.exchange(blocks)?;
        for (from, (t, &want)) in got.iter().zip(recv_rows).enumerate() {
            if t.dim(0)? != want {
                candle_core::bail!("all_to_all_rows: rank {from} sent {} rows, {want} expected", t.dim(0)?);
            }
        }
        Tensor::cat(&got, 0)?.contiguous()
    }
    fn exchange_counts(&self, counts: &[usize]) -> Result<Vec<usize>> {
        let w = self.shared.world;
        if counts.is_empty() || counts.len() % w != 0 {
            candle_core::bail!("exchange_counts: {} counts are not {w} equal blocks (one per rank)", counts.len());
        }
        let dev = candle_core::Device::Cpu;
        let out = counts.chunks(counts.len() / w).map(|c| Tensor::from_vec(c.iter().map(|&c| c as u32).collect(), c.len(), &dev)).collect::<Result<Vec<_>>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank that fails (error or panic) before a collective: the others' collective returns
    /// an error naming it instead of waiting for ever; without failures every rank finishes.
    #[test]
    fn a_failed_rank_releases_the_others() {
        let all = run_ranks(3, |c| -> std::result::Result<Vec<Vec<f64>>, String> {
            if c.rank() == 1 {
                return Err("boom".into());
            }
            c.all_gather_host(&[c.rank() as f64]).map_err(|e| e.to_string())
        });
        let errs: Vec<String> = all.into_iter().map(|r| r.unwrap().unwrap_err()).collect();
        assert_eq!(errs[1], "boom");
        for r in [0, 2] {
            assert!(errs[r].contains("rank 1 failed"), "{errs:?}");
        }

        let all = run_ranks(2, |c| -> std::result::Result<(), String> {
            if c.rank() == 0 {
                panic!("rank 0 panics");
            }
            let t = Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
            c.all_reduce_sum(&t).map(|_| ()).map_err(|e| e.to_string())
        });
        assert!(all[0].is_err());
        assert!(all[1].as_ref().unwrap().as_ref().unwrap_err().contains("rank 0 failed"));

        let all = run_ranks(2, |c| c.all_gather_host(&[c.rank() as f64 + 1.0]));
        for r in all {
            assert_eq!(r.unwrap().unwrap(), vec![vec![1.0], vec![2.0]]);
        }
    }
}
