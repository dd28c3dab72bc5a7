//! Running a group's ranks: thread ranks in this process ([`run_threads`], over a
//! [`local_group`]), or this process as one rank of the NCCL group that `lockstep launch`
//! started ([`join_launched`]).
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

use crate::launch_env::RankEnv;
use crate::local::{local_group, LocalComm};

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
