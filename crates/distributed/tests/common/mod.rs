//! Runs `lockstep_dist::check` over W thread ranks (`local_group`) and asserts every rank
//! passes. Shared by the CPU test (`crates/distributed/tests/ep_equals_single.rs`) and the GPU test
//! (`crates/cli/tests/gpu_ep.rs`).
#![allow(dead_code)]

use std::sync::Arc;

use candle_core::{DType, Device};
use lockstep_dist::check::{check_rank, CheckCase, RankReport};
use lockstep_dist::Collective;

/// Every rank's report; `sabotage`: that rank perturbs its all-reduced gradients (a test of
/// the check itself): adds 1e-3 in f32, doubles them (a contribution counted twice) below.
pub fn run(world: usize, expert_choice: bool, dev: &Device, sabotage: Option<usize>) -> Vec<RankReport> {
    run_case(world, CheckCase { expert_choice, ..CheckCase::default() }, dev, sabotage)
}

pub fn run_case(world: usize, case: CheckCase, dev: &Device, sabotage: Option<usize>) -> Vec<RankReport> {
    std::thread::scope(|s| {
        let handles: Vec<_> = lockstep_dist::local_group(world)
            .into_iter()
            .map(|c| {
                let case = &case;
                s.spawn(move || {
                    let broken = sabotage == Some(c.rank());
                    let double = case.dtype != DType::F32;
                    let comm: Arc<dyn Collective> = if broken { Arc::new(Sabotage(c, double)) } else { Arc::new(c) };
                    check_rank(case, comm, dev).expect("check ran")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

pub fn check(world: usize, expert_choice: bool, dev: &Device) {
    check_dtype(world, expert_choice, dev, DType::F32)
}

/// The check with the model in `dtype` (tolerances of `RankReport::failures` for it).
pub fn check_dtype(world: usize, expert_choice: bool, dev: &Device, dtype: DType) {
    let case = CheckCase { expert_choice, dtype, ..CheckCase::default() };
    for rep in run_case(world, case, dev, None) {
        println!("{}", rep.summary());
        let f = rep.failures(dtype);
        assert!(f.is_empty(), "{dev:?} {dtype:?} world {world} expert_choice {expert_choice} rank {}: {f:?}", rep.rank);
        assert!(rep.grads_compared > 20, "only {} gradients compared", rep.grads_compared);
    }
}

/// A rank whose all-reduce adds a little (or doubles): its replicated gradients differ from
/// the others'.
#[derive(Debug)]
struct Sabotage(lockstep_dist::LocalComm, bool);

impl Collective for Sabotage {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_to_all_rows(&self, s: &candle_core::Tensor, a: &[usize], b: &[usize]) -> lockstep_dist::collective::Result<candle_core::Tensor> {
        self.0.all_to_all_rows(s, a, b)
    }
    fn exchange_counts(&self, c: &[usize]) -> lockstep_dist::collective::Result<Vec<usize>> {
        self.0.exchange_counts(c)
    }
    fn all_reduce_sum(&self, t: &candle_core::Tensor) -> lockstep_dist::collective::Result<candle_core::Tensor> {
        let sum = self.0.all_reduce_sum(t)?;
        Ok(if self.1 { (sum * 2.0)? } else { (sum + 1e-3)? })
    }
    fn all_gather_host(&self, v: &[f64]) -> lockstep_dist::collective::Result<Vec<Vec<f64>>> {
        self.0.all_gather_host(v)
    }
}
