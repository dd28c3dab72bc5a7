//! Running a group's ranks: thread ranks in this process ([`run_threads`], over a
//! [`local_group`]), or this process as one rank of a group its launcher started — torchrun,
//! `srun`, `lockstep launch` ([`Launch`]: from the environment, `rendezvous`): CPU ranks over
//! TCP (`tcp`), GPU ranks over NCCL with the unique id rank 0 published in the store
//! ([`join_launched`] once the id is known).
//!
//! A thread rank that fails (returns an error or panics) aborts its group, and the others'
//! pending and later collectives return [`CollectiveError::Aborted`] naming it instead of
//! waiting for ever. The group keeps the first rank that failed: its error is the real one, the
//! others' are its consequences, and that is the error [`run_threads`] returns.

use std::any::Any;
use std::fmt::Display;
use std::sync::Arc;

use candle_core::Device;
use lockstep_collective::{Collective, CollectiveError};

use crate::launch_env::{LaunchEnvError, RankEnv};
use crate::local::{local_group, LocalComm};
use crate::rendezvous::{env_vars, Rendezvous};
use crate::store::{StoreError, StoreServer};

/// Run `f` on every rank of a new thread group of `world` ranks: every rank's value in rank
/// order, or the error of the first rank that failed (a panic as [`CollectiveError::Panicked`]).
pub fn run_threads<T, E>(world: usize, f: impl Fn(LocalComm) -> Result<T, E> + Sync) -> Result<Vec<T>, E>
where
    T: Send,
    E: Send + Display + From<CollectiveError>,
{
    let group = local_group(world);
    let Some(probe) = group.first().cloned() else { return Ok(Vec::new()) };
    let mut results = run_group(group, &f);
    let failed = |r: &std::thread::Result<Result<T, E>>| !matches!(r, Ok(Ok(_)));
    // the rank that aborted the group first, else (a rank aborted it by hand) the first that failed
    let first = probe.failed().map(|(r, _)| r).filter(|&r| failed(&results[r])).or_else(|| results.iter().position(failed));
    let Some(rank) = first else {
        return Ok(results.into_iter().filter_map(|r| r.ok()?.ok()).collect());
    };
    Err(match results.swap_remove(rank) {
        Ok(Err(e)) => e,
        Err(payload) => CollectiveError::Panicked { rank, cause: panic_message(payload.as_ref()) }.into(),
        Ok(Ok(_)) => unreachable!("rank {rank} was picked as failed"),
    })
}

/// Run `f` on every rank of a new thread group of `world` ranks; a rank that returns an error
/// (or panics) aborts the group. Every rank's own result, in rank order.
pub fn run_ranks<T: Send, E: Send + Display>(world: usize, f: impl Fn(LocalComm) -> Result<T, E> + Sync) -> Vec<std::thread::Result<Result<T, E>>> {
    run_group(local_group(world), &f)
}

fn run_group<T: Send, E: Send + Display>(group: Vec<LocalComm>, f: &(impl Fn(LocalComm) -> Result<T, E> + Sync)) -> Vec<std::thread::Result<Result<T, E>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut guard = AbortOnDrop(Some(c.clone()));
                    let r = f(c);
                    if let (Some(c), Err(e)) = (guard.0.take(), &r) {
                        c.abort(e.to_string());
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

/// Aborts its rank's group when dropped armed: while unwinding from a panic.
struct AbortOnDrop(Option<LocalComm>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.abort("panicked");
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".into(),
    }
}

/// This process's rank of the NCCL process group `lockstep launch` started (described by
/// `env`), and its GPU. Every rank must call it; it returns once all have joined.
#[cfg(feature = "nccl")]
pub fn join_launched(env: &RankEnv) -> Result<(Arc<dyn Collective>, Device), CollectiveError> {
    let (comm, dev) = crate::nccl::NcclComm::init(env)?;
    Ok((Arc::new(comm), dev))
}

#[cfg(not(feature = "nccl"))]
pub fn join_launched(_: &RankEnv) -> Result<(Arc<dyn Collective>, Device), CollectiveError> {
    Err(CollectiveError::Unsupported("started by `lockstep launch`, but this binary was built without NCCL (`--features cuda,nccl`)".into()))
}

/// How this process was started as a rank.
#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    /// An NCCL id handed over in `LOCKSTEP_NCCL_ID` (no store).
    Nccl(RankEnv),
    /// Its launcher's variables: the group meets at rank 0's store.
    Rendezvous(Rendezvous),
}

/// Why this process could not join its group.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Env(#[from] LaunchEnvError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tcp(#[from] crate::tcp::JoinError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// A joined rank: its collective, its device, and (rank 0) the store it hosts.
#[derive(Debug)]
pub struct Joined {
    pub comm: Arc<dyn Collective>,
    pub device: Device,
    pub store: Option<StoreServer>,
}

impl Launch {
    /// From this process's environment (`timeout`: instead of the environment's); `Ok(None)`
    /// when no launcher started it. Parses only: joining is [`Launch::join`].
    pub fn from_env(timeout: Option<std::time::Duration>) -> Result<Option<Self>, LaunchEnvError> {
        Self::from_vars(&env_vars(), timeout)
    }

    pub fn from_vars(vars: &std::collections::HashMap<String, String>, timeout: Option<std::time::Duration>) -> Result<Option<Self>, LaunchEnvError> {
        use crate::launch_env::{NCCL_ID, RANK};
        if vars.contains_key(RANK) && vars.contains_key(NCCL_ID) {
            return Ok(RankEnv::from_vars(vars)?.map(Launch::Nccl));
        }
        Ok(Rendezvous::from_vars(vars)?.map(|mut rv| {
            if let Some(t) = timeout {
                rv.timeout = t;
            }
            Launch::Rendezvous(rv)
        }))
    }

    pub fn rank(&self) -> usize {
        match self {
            Launch::Nccl(e) => e.rank,
            Launch::Rendezvous(r) => r.rank,
        }
    }

    pub fn world_size(&self) -> usize {
        match self {
            Launch::Nccl(e) => e.world_size,
            Launch::Rendezvous(r) => r.world_size,
        }
    }

    /// Join the group: `cpu`, over TCP on the CPU; else over NCCL on `cuda:LOCAL_RANK`. Every
    /// rank must call it; it returns once all have joined (or fails within the timeout).
    pub fn join(&self, cpu: bool) -> Result<Joined, JoinError> {
        match (self, cpu) {
            (Launch::Nccl(_), true) => Err(LaunchEnvError::Bad {
                var: crate::launch_env::NCCL_ID,
                msg: "an NCCL id for GPU ranks, but --device cpu: CPU ranks meet at MASTER_ADDR / MASTER_PORT (`lockstep launch --nproc N`)".into(),
            }
            .into()),
            (Launch::Nccl(env), false) => {
                let (comm, device) = join_launched(env)?;
                Ok(Joined { comm, device, store: None })
            }
            (Launch::Rendezvous(rv), true) => {
                let (store, mut client) = rv.connect()?;
                let ip = store.as_ref().map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |s| s.local_addr().ip());
                let comm = crate::tcp::TcpComm::join(rv.rank, rv.world_size, &rv.host, ip, &mut client, rv.timeout)?;
                Ok(Joined { comm: Arc::new(comm), device: Device::Cpu, store })
            }
            (Launch::Rendezvous(rv), false) => {
                let (env, store) = RankEnv::through_store(rv)?;
                let (comm, device) = join_launched(&env)?;
                Ok(Joined { comm, device, store })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    /// A rank that fails (error or panic) before a collective: the others' collective returns
    /// `Aborted` naming it instead of waiting for ever; without failures every rank finishes.
    #[test]
    fn a_failed_rank_releases_the_others() {
        let all = run_ranks(3, |c| {
            if c.rank() == 1 {
                return Err(CollectiveError::Mismatch("boom".into()));
            }
            c.all_gather_host(&[c.rank() as f64])
        });
        let errs: Vec<CollectiveError> = all.into_iter().map(|r| r.unwrap().unwrap_err()).collect();
        assert!(matches!(&errs[1], CollectiveError::Mismatch(m) if m == "boom"), "{errs:?}");
        for r in [0, 2] {
            assert!(matches!(&errs[r], CollectiveError::Aborted { rank: 1, cause } if cause == "boom"), "{errs:?}");
            assert!(errs[r].is_abort() && errs[r].to_string().contains("rank 1 failed"), "{}", errs[r]);
        }

        let all = run_ranks(2, |c| {
            if c.rank() == 0 {
                panic!("rank 0 panics");
            }
            let t = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
            c.all_reduce_sum(&t).map(|_| ())
        });
        assert!(all[0].is_err());
        assert!(matches!(all[1].as_ref().unwrap(), Err(CollectiveError::Aborted { rank: 0, cause }) if cause == "panicked"), "{:?}", all[1]);

        let all = run_ranks(2, |c| c.all_gather_host(&[c.rank() as f64 + 1.0]));
        for r in all {
            assert_eq!(r.unwrap().unwrap(), vec![vec![1.0], vec![2.0]]);
        }
    }

    /// `run_threads`: values in rank order; else the failed rank's own error, not an abort,
    /// whichever rank it is; a panic named with its rank.
    #[test]
    fn run_threads_returns_the_first_real_error() {
        assert_eq!(run_threads(3, |c| Ok::<_, CollectiveError>(c.rank() * 10)).unwrap(), vec![0, 10, 20]);
        for bad in [0, 2] {
            let e = run_threads(3, |c| {
                if c.rank() == bad {
                    return Err(CollectiveError::Mismatch(format!("rank {bad} is broken")));
                }
                c.all_gather_host(&[1.0])?;
                c.all_gather_host(&[2.0])
            })
            .unwrap_err();
            assert!(matches!(&e, CollectiveError::Mismatch(m) if *m == format!("rank {bad} is broken")), "{e:?}");
        }
        let e = run_threads(2, |c| {
            if c.rank() == 1 {
                panic!("rank 1 panics");
            }
            c.all_gather_host(&[1.0])
        })
        .unwrap_err();
        assert!(matches!(&e, CollectiveError::Panicked { rank: 1, cause } if cause == "rank 1 panics"), "{e:?}");
        assert!(run_threads(0, |_| Ok::<(), CollectiveError>(())).unwrap().is_empty());
    }
}
