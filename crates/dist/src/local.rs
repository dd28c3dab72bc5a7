//! A process group of threads in one process: the same collectives as NCCL, through shared
//! memory. Used by the CPU tests (2 ranks == 1 rank) and usable for CPU runs.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Result, Tensor};

use crate::collective::{offsets, Collective};

#[derive(Debug)]
struct Shared {
    world: usize,
    barrier: Barrier,
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
        barrier: Barrier::new(world),
        tensors: Mutex::new(vec![None; world * world]),
        host: Mutex::new(vec![Vec::new(); world]),
    });
    (0..world).map(|rank| LocalComm { rank, shared: shared.clone() }).collect()
}

impl LocalComm {
    fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
        m.lock().map_err(|_| candle_core::Error::Msg("local collective: another rank panicked".into()))
    }

    /// Post one tensor per destination, wait for everyone, take the ones addressed here.
    fn exchange(&self, out: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let w = self.shared.world;
        {
            let mut slots = Self::lock(&self.shared.tensors)?;
            for (to, t) in out.into_iter().enumerate() {
                slots[self.rank * w + to] = Some(t);
            }
        }
        self.shared.barrier.wait();
        let got = {
            let mut slots = Self::lock(&self.shared.tensors)?;
            (0..w).map(|from| slots[from * w + self.rank].take()).collect::<Option<Vec<_>>>()
        };
        self.shared.barrier.wait();
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
        let dev = candle_core::Device::Cpu;
        let out = counts.iter().map(|&c| Tensor::new(&[c as u32], &dev)).collect::<Result<Vec<_>>>()?;
        self.exchange(out)?.iter().map(|t| Ok(t.to_vec1::<u32>()?[0] as usize)).collect()
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
        self.shared.barrier.wait();
        let all = Self::lock(&self.shared.host)?.clone();
        self.shared.barrier.wait();
        Ok(all)
    }
}
